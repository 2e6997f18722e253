"""The two augmented views μ = A_μ(x), ν = A_ν(x) (paper §III-A.1: "Gaussian blur and contrast enhancement";
spec 002 §2.2).

The paper gives neither parameters nor probabilities (UNSPECIFIED). Ours (PROPOSED, named options): both views are
intensity-only, so they keep the geometry of the patch and token i of μ, μ̂, ν and ν̂ is the same place:

``blur_contrast`` (default)  μ = Gaussian blur, σ ~ U[blur_sigma_min, blur_sigma_max] voxels per sample (nnU-Net's
                             blur range 0.5–1.0); ν = contrast change, (x − mean)·f + mean per sample and channel,
                             f ~ U[1 − contrast_range, 1 + contrast_range] (nnU-Net's 0.75–1.25), clipped to the
                             channel's original range (nnU-Net's ``preserve_range``).
``both``                     each view gets both transforms, with independent random parameters.

Views are made without gradient, on the training device, from the (already nnU-Net-augmented) batch.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

VIEW_MODES = ("blur_contrast", "both")


def gaussian_kernel1d(sigma: float, truncate: float = 3.0) -> torch.Tensor:
    r = max(int(math.ceil(truncate * sigma)), 1)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one sample batch ``x`` (N, C, *spatial) with ``sigma`` voxels on every axis
    (replicate padding); the output has the input's shape."""
    if sigma <= 0:
        return x
    nd = x.dim() - 2
    c = x.shape[1]
    k = gaussian_kernel1d(float(sigma)).to(x.device, x.dtype)
    r = (k.numel() - 1) // 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    out = x
    for axis in range(nd):
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = k.numel()
        w = k.view(shape).expand(c, *shape[1:]).contiguous()
        pad = [0, 0] * nd
        # F.pad lists the last axis first
        pad[2 * (nd - 1 - axis)] = r
        pad[2 * (nd - 1 - axis) + 1] = r
        out = conv(F.pad(out, pad, mode="replicate"), w, groups=c)
    return out


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor, preserve_range: bool = True) -> torch.Tensor:
    """(x − mean)·f + mean per sample and channel; ``factor`` is (B, C) or (B,)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    f = factor.reshape(b, -1).expand(b, c).to(x.dtype).unsqueeze(-1)
    mean = flat.mean(-1, keepdim=True)
    out = (flat - mean) * f + mean
    if preserve_range:
        out = torch.maximum(torch.minimum(out, flat.amax(-1, keepdim=True)), flat.amin(-1, keepdim=True))
    return out.reshape(x.shape)


def blur_view(x: torch.Tensor, sigma_range: Tuple[float, float], generator: torch.Generator = None) -> torch.Tensor:
    lo, hi = sigma_range
    sig = lo + (hi - lo) * torch.rand(x.shape[0], generator=generator)
    return torch.cat([gaussian_blur(x[i:i + 1], float(s)) for i, s in enumerate(sig)], 0)


def contrast_view(x: torch.Tensor, contrast_range: float, generator: torch.Generator = None) -> torch.Tensor:
    f = 1.0 - contrast_range + 2.0 * contrast_range * torch.rand(x.shape[0], x.shape[1], generator=generator)
    return adjust_contrast(x, f.to(x.device))


@torch.no_grad()
def make_views(x: torch.Tensor, mode: str = "blur_contrast", sigma_range: Sequence[float] = (0.5, 1.0),
               contrast_range: float = 0.25, generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(μ, ν), both with the shape of ``x``."""
    if mode not in VIEW_MODES:
        raise ValueError(f"view mode must be one of {VIEW_MODES}, got {mode!r}")
    sr = (float(sigma_range[0]), float(sigma_range[1]))
    if mode == "blur_contrast":
        return blur_view(x, sr, generator), contrast_view(x, contrast_range, generator)
    mu = contrast_view(blur_view(x, sr, generator), contrast_range, generator)
    nu = contrast_view(blur_view(x, sr, generator), contrast_range, generator)
    return mu, nu


__all__ = ["VIEW_MODES", "gaussian_kernel1d", "gaussian_blur", "adjust_contrast", "blur_view", "contrast_view",
           "make_views"]
