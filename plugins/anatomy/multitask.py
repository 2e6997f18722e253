"""The multi-task baseline of GRASP's exploration (spec 003 M5 §2 "Multi-task", M4 §2 naive baselines).

Shared encoder E, pathology decoder D_path (the planned nnU-Net's own decoder: the inference network is stock) and an
anatomy decoder D_ana (same topology, its own output layer over the anatomy classes; outside ``self.network``)::

    L_task = α · L_path / m_path + (1 − α) · L_ana / m_ana,        α = 0.8 (thesis' best, Table 14)

L_path is nnU-Net's loss on the lesion target (Dice + CE, deep supervision), L_ana nnU-Net's Dice + CE over the
(grouped) anatomy classes at full resolution. "Each term is divided by its mean to match magnitudes" (running or
batch mean UNSPECIFIED): m is a running mean of the term's *magnitude* |L| (nnU-Net's Dice + CE is negative once the
soft Dice exceeds the CE, so a plain mean can cross zero), detached, updated before use::

    running: m_t = β · m_{t−1} + (1 − β) · |L_t|,   m_1 = |L_1|      (β = option norm_momentum, 0.99)
    batch:   m_t = |L_t|                                             (each term's gradient has unit scale)
    none:    m_t = 1
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

NORMS = ("running", "batch", "none")


class MagnitudeNormalizedSum(nn.Module):
    """``α · L_path / m_path + (1 − α) · L_ana / m_ana`` with the magnitude normalisation above."""

    def __init__(self, alpha: float = 0.8, norm: str = "running", momentum: float = 0.99, eps: float = 1e-8):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown normalisation {norm!r} ({', '.join(NORMS)})")
        self.alpha, self.norm, self.momentum, self.eps = float(alpha), norm, float(momentum), float(eps)
        self.register_buffer("m_path", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m_ana", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _update(self, name: str, value: torch.Tensor) -> torch.Tensor:
        mag = value.detach().abs().double()
        if self.norm == "none":
            return torch.ones((), dtype=value.dtype, device=value.device)
        if self.norm == "batch":
            m = mag
        else:
            old = getattr(self, name)
            m = mag if int(self.steps) == 0 else self.momentum * old + (1 - self.momentum) * mag
            if self.training:
                setattr(self, name, m.to(old.device))
        return m.clamp_min(self.eps).to(value.dtype)

    def forward(self, l_path: torch.Tensor, l_ana: torch.Tensor) -> Dict[str, torch.Tensor]:
        m_p = self._update("m_path", l_path)
        m_a = self._update("m_ana", l_ana)
        if self.training:
            self.steps += 1
        total = self.alpha * l_path / m_p + (1 - self.alpha) * l_ana / m_a
        return {"loss": total, "m_path": m_p.detach(), "m_ana": m_a.detach()}


def build_anatomy_decoder(network: nn.Module, num_classes: int, n_conv_per_stage, nonlin_first: bool = False
                          ) -> nn.Module:
    """A second nnU-Net ``UNetDecoder`` on the network's encoder (same topology as the pathology decoder), without
    deep supervision, ``num_classes`` outputs. It keeps no reference to the encoder (no shared parameters in its
    state dict); call it on the encoder's skips."""
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    from nnunetv2.utilities.network_initialization import InitWeights_He
    dec = UNetDecoder(network.encoder, num_classes, n_conv_per_stage, deep_supervision=False,
                      nonlin_first=nonlin_first)
    del dec.encoder  # used only while building; forward needs the skips alone
    dec.apply(InitWeights_He(1e-2))
    return dec


__all__ = ["NORMS", "MagnitudeNormalizedSum", "build_anatomy_decoder"]
