"""Small adapters to nnunetv2 2.8.1 internals, in one place."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Replace ``obj.name`` (a module global or attribute) for the duration of one stock call: the smallest hook
    nnU-Net leaves where it looks a function up by name (loader class, input-channel count)."""
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)
