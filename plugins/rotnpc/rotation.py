"""3DRotNPC pretext transform (Li 2026 thesis, Eq. 4.1): rotate a few randomly chosen slices in-plane.

``T(x | s, y) = Rot(x_{s in s}, y in y)``: for a volume with ``D`` slices along the first spatial axis (nnU-Net's
transpose puts the low-resolution axis first), ``k`` slice indices ``s`` are drawn uniformly without replacement and
every chosen slice is rotated in-plane by ``90° · y`` with ``y`` uniform in ``{0, 1, 2, 3}``. Classes
``0, 1, 2, 3`` correspond to ``0°, 90°, 180°, 270°``; slices that were not chosen keep class 0 (so a chosen slice
with ``y = 0`` is indistinguishable from an unchosen one, as in the thesis). Expected label distribution for
``D = 16, k = 4``: class 0 = 13/16, classes 1-3 = 1/16 each.

Rotation convention: ``torch.rot90(slice, y, dims=(-2, -1))`` (counter-clockwise when the first in-plane axis is
drawn downwards), applied to all channels of the slice alike.

Non-square in-plane size: rot90 keeps the shape only for square slices. With ``nonsquare="crop"`` the centred square
of side ``min(H, W)`` of each chosen slice is rotated and the rest of the slice stays as it is; with
``nonsquare="error"`` a :class:`ValueError` is raised (the spec's proposal).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

NUM_ROTATION_CLASSES = 4
NONSQUARE_MODES = ("crop", "error")


class RotatedBatch(NamedTuple):
    """Result of :func:`rotate_slices`."""

    data: torch.Tensor      # (B, C, D, H, W) transformed copy of the input
    labels: torch.Tensor    # (B, D) int64 rotation class per slice (0 for unchosen slices)
    selected: torch.Tensor  # (B, D) bool, True for the k chosen slices


def num_rotated_slices(depth: int, rotated_fraction: float = 0.25, rotated_slices: int = -1) -> int:
    """``k``: ``rotated_slices`` if > 0, else ``round(depth * rotated_fraction)`` (half up), at least 1, at most
    ``depth``. Thesis: depth 16, k = 4."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if rotated_slices is not None and rotated_slices > 0:
        k = int(rotated_slices)
    else:
        if not 0.0 < rotated_fraction <= 1.0:
            raise ValueError(f"rotated_fraction must be in (0, 1], got {rotated_fraction}")
        k = max(1, int(math.floor(depth * rotated_fraction + 0.5)))
    return min(k, depth)


def square_window(h: int, w: int, nonsquare: str = "crop") -> Tuple[slice, slice]:
    """In-plane region that gets rotated: the whole slice if square, else the centred ``min(h, w)`` square."""
    if nonsquare not in NONSQUARE_MODES:
        raise ValueError(f"nonsquare must be one of {NONSQUARE_MODES}, got '{nonsquare}'")
    if h == w:
        return slice(0, h), slice(0, w)
    if nonsquare == "error":
        raise ValueError(f"slice rotation needs a square in-plane size, got {h}x{w} "
                         f"(use nonsquare='crop' to rotate the centred {min(h, w)}x{min(h, w)} square)")
    m = min(h, w)
    oh, ow = (h - m) // 2, (w - m) // 2
    return slice(oh, oh + m), slice(ow, ow + m)


def _check_5d(x: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")


def rotate_slices(x: torch.Tensor, rotated_fraction: float = 0.25, rotated_slices: int = -1,
                  nonsquare: str = "crop", generator: Optional[torch.Generator] = None) -> RotatedBatch:
    """Apply the pretext transform independently to every volume of a ``(B, C, D, H, W)`` batch.

    Returns a transformed copy (the input is not modified), the per-slice labels ``(B, D)`` and the selection mask.
    Random draws use ``generator`` (a CPU ``torch.Generator``) when given.
    """
    _check_5d(x)
    b, _, d, h, w = x.shape
    rows, cols = square_window(h, w, nonsquare)
    k = num_rotated_slices(d, rotated_fraction, rotated_slices)
    # draws on CPU: cheap, and independent of the data's device
    order = torch.argsort(torch.rand(b, d, generator=generator), dim=1)
    chosen = order[:, :k]                                                  # (B, k) without replacement
    classes = torch.randint(0, NUM_ROTATION_CLASSES, (b, k), generator=generator)
    labels = torch.zeros(b, d, dtype=torch.long)
    selected = torch.zeros(b, d, dtype=torch.bool)
    labels.scatter_(1, chosen, classes)
    selected.scatter_(1, chosen, torch.ones_like(chosen, dtype=torch.bool))

    out = x.clone()
    for bi in range(b):
        for si, yi in zip(chosen[bi].tolist(), classes[bi].tolist()):
            if yi:
                out[bi, :, si, rows, cols] = torch.rot90(x[bi, :, si, rows, cols], yi, dims=(-2, -1))
    return RotatedBatch(out, labels.to(x.device), selected.to(x.device))


def unrotate_slices(x: torch.Tensor, labels: torch.Tensor, nonsquare: str = "crop") -> torch.Tensor:
    """Inverse of :func:`rotate_slices` given its labels (rotates every slice back by ``-90° · y``)."""
    _check_5d(x)
    b, _, d, h, w = x.shape
    if tuple(labels.shape) != (b, d):
        raise ValueError(f"labels must have shape {(b, d)}, got {tuple(labels.shape)}")
    rows, cols = square_window(h, w, nonsquare)
    out = x.clone()
    lab = labels.detach().cpu()
    for bi, si in torch.nonzero(lab).tolist():
        yi = int(lab[bi, si])
        out[bi, :, si, rows, cols] = torch.rot90(x[bi, :, si, rows, cols], -yi, dims=(-2, -1))
    return out


__all__ = ["NUM_ROTATION_CLASSES", "NONSQUARE_MODES", "RotatedBatch", "num_rotated_slices", "square_window",
           "rotate_slices", "unrotate_slices"]
