"""Small I/O helpers: atomic writes so that a failed command never leaves a half-written file behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator


def atomic_write_json(obj: Any, path: str, indent: int = 2) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=d)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _json_default(o: Any) -> Any:
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


@contextlib.contextmanager
def atomic_dir(final_path: str) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``final_path``, on failure it is removed."""
    parent = os.path.dirname(os.path.abspath(final_path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp_" + os.path.basename(final_path) + "_", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(final_path):
        old = final_path + ".old_nnx"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_path, old)
        os.replace(tmp, final_path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final_path)


def read_json(path: str, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or invalid file is a one-line :class:`~nnx.errors.NNXError`."""
    from nnx.errors import NNXError
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NNXError(f"{what} not found", path) from None
    except json.JSONDecodeError as e:
        raise NNXError(f"invalid JSON in {what}: {e.msg} at line {e.lineno} column {e.colno}", path) from None
    except OSError as e:
        raise NNXError(f"cannot read {what}: {e.strerror}", path) from None
