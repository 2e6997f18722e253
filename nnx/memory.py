"""Memory profiles: how one training step of a trainer relates to one stock step of the planned network.

A trainer declares, as a plain class attribute (planning never instantiates trainers)::

    nnx_memory = {"activation_factor": k,        # multiplier on the planned U-Net's activations
                  "static_gb": s,                # parameters / optimizer state of extra modules
                  "extra_architectures": [       # further networks whose estimates add up (same patch):
                      {"feature_scale": 0.5,         #   the planned topology with scaled features, and/or
                       "arch_kwargs": {...},         #   explicit overrides of the planned arch_kwargs, and/or
                       "network_class_name": "...",  #   another network class (needs compute_conv_feature_map_size)
                       "factor": 1.0}]}              #   multiplier on that estimate

The stock trainer's profile is the identity. ``nnx_plan --calibrate`` measures the stock trainer and a trainer at
two batch sizes of the same planned configuration, fits ``peak = static + per_sample * batch`` for both and stores
``activation_factor = per_sample(trainer) / per_sample(stock)`` and ``static_gb = static(trainer) - static(stock)``
per device kind in the calibration file (``$NNX_HOME/memory_calibration.json``, default ``~/.nnx``); planning then
uses the measured factors for that device kind instead of the declared ones.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional, Tuple

IDENTITY: Dict[str, Any] = {"activation_factor": 1.0, "static_gb": 0.0, "extra_architectures": []}


def memory_profile(cls: type) -> Dict[str, Any]:
    prof = dict(IDENTITY)
    prof.update(getattr(cls, "nnx_memory", None) or {})
    return prof


def calibration_file() -> str:
    home = os.environ.get("NNX_HOME") or os.path.join(os.path.expanduser("~"), ".nnx")
    return os.path.join(home, "memory_calibration.json")


def device_kind(device: str) -> str:
    return "cpu" if str(device).startswith("cpu") else "cuda"


def load_calibration() -> Dict[str, Any]:
    p = calibration_file()
    if not os.path.isfile(p):
        return {}
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        from nnx.errors import NNXError
        raise NNXError("calibration file is not valid JSON (delete it to start over)", p) from None


def calibrated(trainer: str, device: str) -> Optional[Dict[str, Any]]:
    return load_calibration().get(trainer, {}).get(device_kind(device))


def store_calibration(trainer: str, device: str, entry: Dict[str, Any]) -> str:
    from nnx.io_utils import atomic_write_json
    data = load_calibration()
    data.setdefault(trainer, {})[device_kind(device)] = dict(entry, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    atomic_write_json(data, calibration_file())
    return calibration_file()


def effective_profile(cls: type, device: str = "cuda") -> Tuple[Dict[str, Any], str]:
    """The profile planning uses: calibrated factors for this device kind if measured, else the declared ones."""
    return with_calibration(memory_profile(cls), cls.__name__, device)


def with_calibration(declared: Dict[str, Any], trainer: str, device: str) -> Tuple[Dict[str, Any], str]:
    """``declared`` with the calibrated factors of ``trainer`` on this device kind, if any, and the source."""
    prof = dict(declared)
    cal = calibrated(trainer, device)
    if cal:
        prof.update({k: cal[k] for k in ("activation_factor", "static_gb") if k in cal})
        return prof, f"calibrated ({device_kind(device)}, {cal.get('date', '?')})"
    return prof, "declared"


def fit_profile(stock_points, trainer_points) -> Dict[str, float]:
    """Fit ``peak = static + per_sample * batch`` to two or more (batch, peak_gb) points of each trainer."""
    import numpy as np

    def line(points):
        b = np.array([p[0] for p in points], dtype=float)
        y = np.array([p[1] for p in points], dtype=float)
        if len(set(b)) < 2:
            return 0.0, float(y.mean() / b.mean())
        slope, icpt = np.polyfit(b, y, 1)
        return float(icpt), float(slope)

    s0, a0 = line(stock_points)
    s1, a1 = line(trainer_points)
    if a0 <= 0:
        from nnx.errors import NNXError
        raise NNXError("stock trainer's memory did not grow with the batch size; cannot calibrate (measure on a "
                       "larger configuration)")
    return {"activation_factor": round(max(a1, 0.0) / a0, 3), "static_gb": round(max(s1 - s0, 0.0), 3),
            "stock_per_sample_gb": round(a0, 4), "trainer_per_sample_gb": round(a1, 4)}


def _profile_cache_file() -> str:
    return os.path.join(os.path.dirname(calibration_file()), "profile_cache.json")


def declared_profile(name: str, cached_only: bool = False) -> Optional[Dict[str, Any]]:
    """``memory_profile`` of a registered trainer, served from a small cache while the files of the trainer's
    package (and nnx's version) are unchanged, so that planning does not have to import the trainer (importing
    nnU-Net's trainer module costs seconds). ``cached_only``: None instead of importing on a cache miss."""
    import hashlib
    import importlib.util
    from nnx import __version__
    from nnx.registry import load_trainer, trainer_target
    target = trainer_target(name)
    module = target.split(":")[0]
    try:
        spec = importlib.util.find_spec(module)
        folder = os.path.dirname(spec.origin) if spec and spec.origin else None
    except (ImportError, ValueError):
        folder = None
    key = None
    if folder:
        stamp = [(f, os.stat(os.path.join(folder, f)).st_mtime_ns, os.stat(os.path.join(folder, f)).st_size)
                 for f in sorted(os.listdir(folder)) if f.endswith(".py")]
        key = hashlib.sha1(json.dumps([target, __version__, stamp]).encode()).hexdigest()
    path = _profile_cache_file()
    cache: Dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    hit = cache.get(name)
    if key and hit and hit.get("key") == key:
        return dict(hit["profile"])
    if cached_only:
        return None
    prof = memory_profile(load_trainer(name))
    if key:
        cache[name] = {"key": key, "profile": prof}
        try:
            from nnx.io_utils import atomic_write_json
            atomic_write_json(cache, path)
        except OSError:
            pass  # a read-only home only costs the import next time
    return prof
