"""``CSUNetTrainer``: the planned nnU-Net pipeline with CS-Unet (Liu 2025 thesis ch. 3, spec
``shared/specs/001-liu-thesis.md`` §3.3, §3.7) as the network.

Everything but the network and the optimiser is nnU-Net's: preprocessing, patch/batch from the plan, data
augmentation, Dice+CE with deep supervision (CS-Unet has 1x1 heads on every nnU-Net scale), validation, sliding-
window prediction. Optimiser (option ``optimizer``):

* ``adamw`` (default; spec §3.3/§3.7 "faithful variant"): AdamW, ``initial_lr`` 1e-3 (thesis, Synapse), weight
  decay 5e-4 (thesis), linear warm-up over ``warmup_epochs`` epochs (default -1 = auto: the thesis' 10 epochs, but
  at most its proportion 10/300 of the run, at least 1: 10 of nnU-Net's 1000 epochs, 1 of a 20-epoch run), then
  nnU-Net's poly decay (exponent 0.9, [code]) over the remaining epochs, stepped per epoch like nnU-Net's
  scheduler::

      lr(e) = lr0 * (e + 1) / W                              for e < W
      lr(e) = lr0 * (1 - (e - W) / (E - W)) ** 0.9           for e >= W      (E epochs, W = min(warm-up, E - 1))

* ``sgd``: nnU-Net's SGD (momentum 0.99, Nesterov) with poly decay; set ``initial_lr=0.01`` for nnU-Net's value.

Inference (stock ``nnUNetv2_predict``, ``nnx_predict``, nnU-Net validation): the weights carry their build
configuration (buffer ``csunet_config``, see :mod:`.network`), so the static ``build_network_architecture``, which
sees the plan and patch size but not the trainer options, builds the trained architecture when the weights load.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
from torch.optim.lr_scheduler import _LRScheduler

from nnx.errors import NNXError
from nnx.options import Option
from nnx.trainer_base import nnxTrainer

from .network import (CSUNET_OPTIONS, CSUNet, build_csunet_from_managers, check_options, csunet_build_options,
                      csunet_memory_profile, options_subset)

OPTIMIZERS = ("adamw", "sgd")


class WarmupPolyLR(_LRScheduler):
    """Linear warm-up then poly decay, per epoch (formula in the module docstring); ``step(epoch)`` like nnU-Net's
    PolyLRScheduler."""

    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, exponent: float = 0.9):
        self.initial_lr, self.max_steps, self.exponent = float(initial_lr), int(max_steps), float(exponent)
        self.warmup_steps = max(0, min(int(warmup_steps), self.max_steps - 1))
        self.ctr = 0
        super().__init__(optimizer, -1)

    def lr_at(self, step: int) -> float:
        w, e = self.warmup_steps, int(step)
        if e < w:
            return self.initial_lr * (e + 1) / w
        return self.initial_lr * max(0.0, 1 - (e - w) / max(1, self.max_steps - w)) ** self.exponent

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.lr_at(current_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self):
        return self._last_lr


def warmup_epochs(option: int, epochs: int) -> int:
    """The warm-up length: the option, or for -1 min(10, round(epochs / 30)) but at least 1 (thesis: 10 of 300)."""
    if option >= 0:
        return int(option)
    return max(1, min(10, int(round(epochs / 30))))


def unwrap_csunet(network: torch.nn.Module) -> CSUNet:
    mod = network
    for _ in range(3):
        if isinstance(mod, CSUNet):
            return mod
        mod = getattr(mod, "module", None) or getattr(mod, "_orig_mod", None) or mod
    if not isinstance(mod, CSUNet):
        raise TypeError(f"not a CS-Unet: {type(network).__name__}")
    return mod


class CSUNetTrainer(nnxTrainer):
    nnx_summary = ("CS-Unet: Convolutional Swin-Unet (conv embedding, depthwise-conv attention projections, conv "
                   "feed-forward, conv skips, no positional embedding) built from the plan, AdamW + warm-up")
    nnx_source = "Liu 2025 thesis ch. 3 (CS-Unet, ICASSP 2023); spec shared/specs/001-liu-thesis.md M1 (§3)"
    nnx_options = {
        **CSUNET_OPTIONS,
        "optimizer": Option("adamw", "adamw (thesis: AdamW, warm-up, poly) or sgd (nnU-Net's SGD + poly)", str,
                            choices=OPTIMIZERS),
        "initial_lr": Option(1e-3, "initial learning rate (thesis AdamW: 1e-3 Synapse, 5e-3 ACDC; nnU-Net SGD: 1e-2)",
                             float, attr="initial_lr"),
        "weight_decay": Option(5e-4, "weight decay (thesis 5e-4; [code] 5e-3; nnU-Net SGD 3e-5)", float,
                               attr="weight_decay"),
        "warmup_epochs": Option(-1, "linear learning-rate warm-up epochs (adamw only); -1 = auto: min(10, "
                                    "round(epochs/30)), at least 1 (thesis: 10 of 300 epochs)", int),
    }
    # the CS-Unet replaces the planned U-Net: its activations (defaults of CSUNET_OPTIONS) instead of the U-Net's.
    # static: weights + gradients + two AdamW moments of the CS-Unet (16 B/parameter) minus what the reference
    # holds for the U-Net with SGD (12 B/parameter); at a 6-stage 3D GPU plan 39.6 M vs 31.1 M parameters: 0.26 GB
    nnx_memory = csunet_memory_profile(static_gb=0.26)
    nnx_inference_network_is_stock = False

    @classmethod
    def nnx_check_options(cls, values: Dict[str, Any], source: str) -> None:
        super().nnx_check_options(values, source)
        try:
            check_options(options_subset(values))
        except ValueError as e:
            raise NNXError(str(e), source) from None
        if values["warmup_epochs"] < -1:
            raise NNXError(f"option 'warmup_epochs' must be >= 0 (or -1 = auto), got {values['warmup_epochs']}",
                           source)
        if not (values["initial_lr"] > 0 and math.isfinite(values["initial_lr"])):
            raise NNXError(f"option 'initial_lr' must be > 0, got {values['initial_lr']}", source)
        if values["weight_decay"] < 0:
            raise NNXError(f"option 'weight_decay' must be >= 0, got {values['weight_decay']}", source)

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        # trainer options arrive through csunet_build_options() (set in initialize); at prediction time the
        # defaults are built and the checkpoint's csunet_config rebuilds the trained architecture on load
        return build_csunet_from_managers(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)

    def initialize(self):
        with csunet_build_options(options_subset(self.nnx_opts)):
            super().initialize()
        net = unwrap_csunet(self.network)
        net.rebuild_on_load = False  # the optimizer holds these parameters
        lay = net.layout
        n_par = sum(p.numel() for p in net.parameters())
        stages = sorted(lay["heads"])
        self.print_to_log_file(
            f"CS-Unet: {n_par / 1e6:.2f} M parameters, widths {lay['dims']}, depths {lay['depths']}, heads "
            f"{[lay['heads'][k] for k in stages]}, windows {[lay['windows'][k] for k in stages]}, shifts "
            f"{[lay['shifts'][k] for k in stages]}, token grids {lay['grids'][2:]}; optimizer "
            f"{self.nnx_opts['optimizer']} lr {self.initial_lr} wd {self.weight_decay}"
            + (f", warm-up {self.csunet_warmup_epochs} epochs" if self.nnx_opts["optimizer"] == "adamw" else ""))

    def configure_optimizers(self):
        if self.nnx_opts["optimizer"] == "sgd":
            return super().configure_optimizers()
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, WarmupPolyLR(optimizer, self.initial_lr, self.num_epochs, self.csunet_warmup_epochs)

    @property
    def csunet_warmup_epochs(self) -> int:
        return warmup_epochs(self.nnx_opts["warmup_epochs"], self.num_epochs)


__all__ = ["CSUNetTrainer", "WarmupPolyLR", "warmup_epochs", "unwrap_csunet", "OPTIMIZERS"]
