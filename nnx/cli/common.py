"""Argument helpers shared by the nnx_* commands."""
from __future__ import annotations

import os
from typing import Optional

from nnx.errors import NNXError


def pick_device(name: Optional[str]):
    """``cuda`` | ``cpu`` | ``mps``; None -> cuda if available, else cpu (nnU-Net's own default is cuda)."""
    import torch
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            print("nnx: no CUDA device found, running on CPU (-device cpu)")
    if name not in ("cpu", "cuda", "mps"):
        raise NNXError(f"-device must be cpu, cuda or mps, got '{name}'")
    if name == "cuda" and not torch.cuda.is_available():
        raise NNXError("-device cuda requested but torch sees no CUDA device (use -device cpu)")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise NNXError("-device mps requested but MPS is not available")
    if name == "cpu":  # every core, as nnUNetv2_train does, unless OMP_NUM_THREADS says otherwise
        torch.set_num_threads(cpu_threads())
    elif name == "cuda":  # as nnUNetv2_train does: the GPU does the work, data augmentation has its own workers
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # can only be set once per process, before parallel work started
            pass
    return torch.device(name)


def cpu_threads() -> int:
    """Torch threads for CPU work: ``OMP_NUM_THREADS`` if set (e.g. 1 on a machine shared with other jobs, where
    OpenMP threads waiting for a busy core stall every step), else every core."""
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "") or 0)
    except ValueError:
        n = 0
    return n if n > 0 else (os.cpu_count() or 1)


def parse_fold(text: str):
    if text == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        raise NNXError(f"fold must be an integer or 'all', got '{text}'") from None
    if fold < 0:
        raise NNXError(f"fold must be >= 0, got {fold}")
    return fold


def default_processes() -> int:
    from nnunetv2.configuration import default_num_processes
    return int(default_num_processes)


def load_plans(dataset_name: str, plans_identifier: str) -> dict:
    from nnunetv2.paths import nnUNet_preprocessed
    path = os.path.join(os.fspath(nnUNet_preprocessed), dataset_name, plans_identifier + ".json")
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        avail = sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json") and "Plans" in f) \
            if os.path.isdir(folder) else []
        hint = f" (available: {', '.join(avail)})" if avail else " (run nnx_plan first)"
        raise NNXError(f"plans file not found{hint}", path)
    from nnx.io_utils import read_json
    return read_json(path, "plans file")


def check_configuration(plans: dict, configuration: str, where: str) -> None:
    configs = sorted(plans.get("configurations", {}))
    if configuration not in configs:
        raise NNXError(f"configuration '{configuration}' not in plans (available: {', '.join(configs)})", where)
