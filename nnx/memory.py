"""Memory profiles: how one training step of a trainer relates to one stock step of the planned network.

A trainer declares ``nnx_memory = {"activation_factor": k, "static_gb": s, "extra_architectures": [...]}`` as a
plain class attribute (planning never instantiates trainers). The stock trainer's profile is the identity.
"""
from __future__ import annotations

from typing import Any, Dict

IDENTITY: Dict[str, Any] = {"activation_factor": 1.0, "static_gb": 0.0, "extra_architectures": []}


def memory_profile(cls: type) -> Dict[str, Any]:
    prof = dict(IDENTITY)
    prof.update(getattr(cls, "nnx_memory", None) or {})
    return prof
