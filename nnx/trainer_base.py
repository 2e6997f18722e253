"""Base class of every nnx trainer.

An nnx trainer is an ``nnUNetTrainer`` subclass with the exact constructor signature
``(plans, configuration, fold, dataset_json, device)`` plus a few class attributes that nnx reads without
instantiating it:

``nnx_summary``      one line shown by ``nnx_trainers``
``nnx_source``       source document / spec section
``nnx_requires``     ``{"tiers": [...], "inputs": [...]}``: annotation tiers and inputs it needs
``nnx_options``      ``{"key": Option(default, "help")}``: its own options (common ones are always there);
                     ranges and combinations are checked in the classmethod ``nnx_check_options``
``nnx_memory``       memory profile for planning (see :mod:`nnx.memory`)
``nnx_inference_network_is_stock``  False if inference needs more than nnU-Net's own network

Options are read from ``NNX_TRAINER_OPTS`` (set by ``nnx_train`` or by the user under stock ``nnUNetv2_train``),
validated *before* nnU-Net creates any output folder, applied, and written to ``<fold>/nnx_config.json``.
Modules that must not reach inference (teachers, heads) live outside ``self.network``, are created before
``configure_optimizers()`` and saved under the checkpoint key ``nnx_extra`` through :meth:`nnx_extra_state`.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnx import options as nnx_options


class nnxTrainerMixin:
    """Marker + option handling shared by all nnx trainers (use :class:`nnxTrainer`)."""

    nnx_summary: str = ""
    nnx_source: str = ""
    nnx_requires: Dict[str, Any] = {"tiers": ["expert"], "inputs": ["images"]}
    nnx_options: Dict[str, nnx_options.Option] = {}
    nnx_memory: Dict[str, Any] = {}
    nnx_inference_network_is_stock: bool = True

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], source: str) -> None:
        """Check option values beyond type and choices (ranges, combinations); raise NNXError(msg, source).
        Called by :func:`nnx.options.resolve`, i.e. by nnx_train and before nnU-Net creates any folder."""

    def nnx_extra_state(self) -> Dict[str, Any]:
        """State of plugin-only modules to store in the checkpoint (key ``nnx_extra``). Override."""
        return {}

    def nnx_load_extra_state(self, state: Dict[str, Any]) -> None:
        """Restore what :meth:`nnx_extra_state` returned. Override."""


class nnxTrainer(nnxTrainerMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        values = nnx_options.options_from_env(type(self))  # raises before any folder is created
        super().__init__(plans, configuration, fold, dataset_json, device)
        source = os.environ.get(nnx_options.SOURCE_ENV_VAR) or (
            nnx_options.ENV_VAR if os.environ.get(nnx_options.ENV_VAR) else "defaults")
        nnx_options.apply(self, values, source)

    def save_checkpoint(self, filename: str) -> None:
        extra = self.nnx_extra_state()
        if not extra:
            return super().save_checkpoint(filename)
        # build the checkpoint once, with the extra state, instead of rewriting the file
        orig_save = torch.save

        def save_with_extra(obj, f, *a, **kw):
            if isinstance(obj, dict) and "network_weights" in obj:
                obj = dict(obj, nnx_extra=extra, nnx_trainer_name=type(self).__name__)
            return orig_save(obj, f, *a, **kw)

        torch.save = save_with_extra
        try:
            super().save_checkpoint(filename)
        finally:
            torch.save = orig_save

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            ckpt = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        else:
            ckpt = filename_or_checkpoint
        if ckpt.get("nnx_extra"):
            self.nnx_load_extra_state(ckpt["nnx_extra"])
