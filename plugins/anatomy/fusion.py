"""GRASP's bottleneck fusion (spec 003 M5 §2 steps 3-6, Fig. 25): anatomy features from a frozen encoder enter the
pathology encoder's deepest stages through a gated residual.

For one fused stage with pathology features ``Z_path`` (B, C, *S) and anatomy features ``Z_ana`` (B, C_a, *S_a)::

    A     = AdaptivePool_S(Conv1x1x1_{C_a -> C}(Z_ana))          AlignBlock
    Ẑ_p   = SE(SA(Z_path)),   Ẑ_a = SE(SA(A))                     spatial (CBAM), then channel (SE) attention;
                                                                  each map has its own SA and SE
    Q     = flatten(Ẑ_p) (B, N, C),   K = V = flatten(Ẑ_a)
    Q'    = Q + MHA_self(LN(Q))                                   self-attention, h heads
    Q''   = Q' + MHA_cross(LN(Q'), LN(K), LN(V))                  cross-attention to the anatomy tokens
    O     = reshape(Q'' + FFN(LN(Q'')))
    Z̃     = δ·O + (1 − δ)·Z_path,  δ = sigmoid(w), w = 0 at start (δ = 0.5)    gated residual (raw Z_path)

The thesis leaves the block's norms, FFN, residuals and positional encoding open (spec M5 ambiguity 3): we use a
pre-norm transformer block (LayerNorm, residual around each attention, FFN with ratio ``ffn_ratio``) without
positional encoding (the gated residual keeps Z_path's spatial layout). SA kernel 7 and SE reduction 16 are the
CBAM / SE defaults (options).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn


def _conv(ndim: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[ndim]


class AlignBlock(nn.Module):
    """Pointwise conv to the pathology channel count, then adaptive average pooling to the pathology stage's spatial
    shape (spec M5 §2 step 3)."""

    def __init__(self, in_channels: int, out_channels: int, ndim: int = 3):
        super().__init__()
        self.proj = _conv(ndim)(in_channels, out_channels, kernel_size=1)
        self.pool = {2: nn.functional.adaptive_avg_pool2d, 3: nn.functional.adaptive_avg_pool3d}[ndim]

    def forward(self, z_ana: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
        x = self.proj(z_ana)
        if tuple(x.shape[2:]) != tuple(spatial):
            x = self.pool(x, tuple(int(s) for s in spatial))
        return x


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel-wise mean and max -> conv (kernel k) -> sigmoid -> multiply."""

    def __init__(self, ndim: int = 3, kernel_size: int = 7):
        super().__init__()
        self.conv = _conv(ndim)(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(s))


class SqueezeExcitation(nn.Module):
    """SE channel attention: global average -> FC(C -> C/r) -> ReLU -> FC -> sigmoid -> multiply."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc(x.flatten(2).mean(2)))
        return x * w.view(*w.shape, *([1] * (x.ndim - 2)))


class FusionBlock(nn.Module):
    """One fused stage: AlignBlock, SA+SE on both maps, self- then cross-attention, gated residual."""

    def __init__(self, c_path: int, c_ana: int, ndim: int = 3, heads: int = 8, sa_kernel: int = 7,
                 se_reduction: int = 16, ffn_ratio: float = 2.0):
        super().__init__()
        if c_path % heads:
            raise ValueError(f"{c_path} pathology channels are not divisible by {heads} attention heads")
        self.align = AlignBlock(c_ana, c_path, ndim)
        self.sa_path, self.sa_ana = SpatialAttention(ndim, sa_kernel), SpatialAttention(ndim, sa_kernel)
        self.se_path, self.se_ana = SqueezeExcitation(c_path, se_reduction), SqueezeExcitation(c_path, se_reduction)
        self.norm_q1, self.norm_q2, self.norm_kv, self.norm_f = (nn.LayerNorm(c_path) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(c_path, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(c_path, heads, batch_first=True)
        hidden = max(1, int(round(ffn_ratio * c_path)))
        self.ffn = nn.Sequential(nn.Linear(c_path, hidden), nn.GELU(), nn.Linear(hidden, c_path))
        self.w = nn.Parameter(torch.zeros(()))  # gate logit: delta = sigmoid(w) = 0.5 at start

    @property
    def delta(self) -> torch.Tensor:
        return torch.sigmoid(self.w)

    def attend(self, z_path: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """O: the transformer block on the recalibrated maps (same shape as z_path)."""
        zp = self.se_path(self.sa_path(z_path))
        za = self.se_ana(self.sa_ana(a))
        shape = zp.shape
        q = zp.flatten(2).transpose(1, 2)   # (B, N, C)
        kv = za.flatten(2).transpose(1, 2)
        h = self.norm_q1(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kvn = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm_q2(q), kvn, kvn, need_weights=False)[0]
        q = q + self.ffn(self.norm_f(q))
        return q.transpose(1, 2).reshape(shape)

    def forward(self, z_path: torch.Tensor, z_ana: torch.Tensor) -> torch.Tensor:
        a = self.align(z_ana, z_path.shape[2:])
        o = self.attend(z_path, a)
        d = self.delta
        return d * o + (1 - d) * z_path


class GRASPFusion(nn.Module):
    """Fusion blocks for the ``n`` deepest encoder stages (deepest first in ``blocks``)."""

    def __init__(self, c_path: Sequence[int], c_ana: Sequence[int], n_stages: int = 2, ndim: int = 3, heads: int = 8,
                 sa_kernel: int = 7, se_reduction: int = 16, ffn_ratio: float = 2.0):
        super().__init__()
        if n_stages < 1 or n_stages > min(len(c_path), len(c_ana)):
            raise ValueError(f"cannot fuse {n_stages} stages of encoders with {len(c_path)} and {len(c_ana)} stages")
        self.n_stages = n_stages
        self.blocks = nn.ModuleList(
            FusionBlock(int(c_path[-1 - j]), int(c_ana[-1 - j]), ndim, heads, sa_kernel, se_reduction, ffn_ratio)
            for j in range(n_stages))

    def forward(self, skips: List[torch.Tensor], ana_skips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        out = list(skips)
        for j, block in enumerate(self.blocks):
            out[-1 - j] = block(skips[-1 - j], ana_skips[-1 - j])
        return out


__all__ = ["AlignBlock", "SpatialAttention", "SqueezeExcitation", "FusionBlock", "GRASPFusion"]
