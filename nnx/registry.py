"""Trainer registry: every trainer nnx knows comes from the ``nnx.trainers`` entry-point group.

nnx's own plugins register there in ``pyproject.toml``; a third-party package registers its trainers the same way::

    [project.entry-points."nnx.trainers"]
    MyTrainer = "my_package.my_module:MyTrainer"

The stock ``nnUNetTrainer`` is registered as the baseline. Loading a trainer imports only its own module.
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Dict, List, Optional

from nnx.errors import NNXError

ENTRY_POINT_GROUP = "nnx.trainers"
BASELINE = "nnUNetTrainer"
_BASELINE_TARGET = "nnunetv2.training.nnUNetTrainer.nnUNetTrainer:nnUNetTrainer"


def _entry_points() -> Dict[str, EntryPoint]:
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if BASELINE not in eps:  # the baseline is always there, even from a source checkout
        eps[BASELINE] = EntryPoint(BASELINE, _BASELINE_TARGET, ENTRY_POINT_GROUP)
    return eps


def trainer_names() -> List[str]:
    names = sorted(_entry_points())
    names.remove(BASELINE)
    return [BASELINE] + names


def trainer_target(name: str) -> str:
    """``module:Class`` of a registered trainer (no import)."""
    eps = _entry_points()
    if name not in eps:
        raise unknown_trainer(name)
    return eps[name].value


def unknown_trainer(name: str) -> NNXError:
    names = trainer_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    if not close:
        close = [n for n in names if name.lower() in n.lower() or n.lower() in name.lower()][:3]
    hint = f"; closest registered: {', '.join(close)}" if close else ""
    return NNXError(f"unknown trainer '{name}'{hint} (run nnx_trainers for the list)")


def load_trainer(name: str) -> type:
    """Import and return the trainer class registered under ``name``."""
    target = trainer_target(name)
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = module
    for part in attr.split("."):
        cls = getattr(cls, part)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    if not (isinstance(cls, type) and issubclass(cls, nnUNetTrainer)):
        raise NNXError(f"entry point '{name}' ({target}) is not an nnUNetTrainer subclass")
    if cls.__name__ != name:
        raise NNXError(f"entry point '{name}' points to class '{cls.__name__}': names must match, because stock "
                       f"nnU-Net finds trainers by class name")
    return cls


def is_nnx_trainer(cls: type) -> bool:
    from nnx.trainer_base import nnxTrainerMixin
    return issubclass(cls, nnxTrainerMixin)


def inference_network_is_stock(cls: type) -> bool:
    """True if the network the predictor builds for ``cls`` is nnU-Net's own, so a checkpoint can be exported."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    same_builder = getattr(cls.build_network_architecture, "__func__", cls.build_network_architecture) is \
        getattr(nnUNetTrainer.build_network_architecture, "__func__", nnUNetTrainer.build_network_architecture)
    return bool(getattr(cls, "nnx_inference_network_is_stock", True)) and same_builder


def stock_weights_converter(cls: type) -> Optional[Callable[[dict], dict]]:
    """For ``nnx_export``: a function from a checkpoint's ``network_weights`` to the weights of nnU-Net's own
    network (identity for a stock inference network, else the trainer's ``nnx_stock_network_weights``), or None if
    the trainer's models cannot run as plain nnU-Net models."""
    if inference_network_is_stock(cls):
        return lambda weights: weights
    return getattr(cls, "nnx_stock_network_weights", None)


def requirements(cls: type) -> dict:
    """``nnx_requires`` with defaults filled in (stock trainers: every labeled tier, no extra entries)."""
    from nnx.trainer_base import DEFAULT_REQUIRES
    req = dict(DEFAULT_REQUIRES)
    req.update(getattr(cls, "nnx_requires", None) or {})
    return {k: list(v) for k, v in req.items()}


def describe(cls: type) -> Dict[str, Any]:
    """Everything ``nnx_trainers`` prints about a trainer (read from class attributes, no instantiation)."""
    from nnx.options import options_table
    from nnx.memory import memory_profile
    baseline = cls.__name__ == BASELINE
    return {
        "name": cls.__name__,
        "summary": getattr(cls, "nnx_summary", "") or
        ("stock nnU-Net trainer: the baseline every method is compared with" if baseline else
         (cls.__doc__ or "").strip().split("\n")[0]),
        "source": getattr(cls, "nnx_source", "") or ("nnU-Net v2 (Isensee et al., Nature Methods 2021)"
                                                      if baseline else ""),
        "requires": requirements(cls),
        "options": options_table(cls),
        "predict_options": list(getattr(cls, "nnx_inference_options", ()) or ()),
        "memory_profile": memory_profile(cls),
        "inference_network_is_stock": inference_network_is_stock(cls),
        "module": f"{cls.__module__}:{cls.__qualname__}",
        "baseline": baseline,
    }
