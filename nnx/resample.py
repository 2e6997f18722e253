"""Resampling of sparse annotations (scribbles) that keeps every stroke.

nnU-Net resamples label maps per label (one-hot, linear, then argmax). That is label-safe for dense maps, but a
one-voxel-thin stroke can vanish when the grid gets coarser, and a scribble experiment then silently trains on
less supervision than the user drew. :func:`resample_scribbles` combines two mappings:

1. *backward nearest neighbour*: every output voxel takes the value of the input voxel its centre falls into
   (what nnU-Net's order-0 resampling does);
2. *forward splat*: every annotated input voxel writes its class into the output voxel its centre falls into,
   classes ordered from most to least frequent so that where strokes of two classes meet in one coarse voxel
   the rarer class wins.

Consequences (tested): with an unchanged shape the output is the input; no value that is not in the input
appears; every class present before is present after; every voxel of the input stroke maps to an annotated
output voxel (a stroke only disappears if a rarer class occupies all of its output voxels).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def _centre_index(n_in: int, n_out: int) -> np.ndarray:
    """Input index whose cell contains the centre of each output voxel (backward mapping)."""
    idx = np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64)
    return np.clip(idx, 0, n_in - 1)


def _forward_index(idx: np.ndarray, n_in: int, n_out: int) -> np.ndarray:
    """Output voxel containing the centre of input voxels ``idx`` (forward mapping)."""
    out = np.floor((idx + 0.5) * n_out / n_in).astype(np.int64)
    return np.clip(out, 0, n_out - 1)


def resample_scribbles(seg: np.ndarray, new_shape: Sequence[int], ignore_value: int) -> np.ndarray:
    """Resample a scribble map ``seg`` (``(X, Y, Z)`` or ``(1, X, Y, Z)``) to ``new_shape`` keeping every stroke.

    Voxels equal to ``ignore_value`` (and negative values, nnU-Net's outside-the-crop marker) are unannotated.
    """
    squeeze = False
    if seg.ndim == len(new_shape) + 1:
        if seg.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {seg.shape}")
        seg, squeeze = seg[0], True
    new_shape = tuple(int(s) for s in new_shape)
    if seg.shape == new_shape:
        out = seg.copy()
        return out[None] if squeeze else out
    idx = [_centre_index(n_in, n_out) for n_in, n_out in zip(seg.shape, new_shape)]
    out = seg[np.ix_(*idx)].copy()
    annotated = (seg != ignore_value) & (seg >= 0)
    values, counts = np.unique(seg[annotated], return_counts=True)
    for v in values[np.argsort(-counts, kind="stable")]:
        coords = np.nonzero(seg == v)
        target = tuple(_forward_index(c, n_in, n_out) for c, n_in, n_out in zip(coords, seg.shape, new_shape))
        out[target] = v
    return out[None] if squeeze else out


def count_labels(seg: np.ndarray, ignore_value=None) -> Dict[int, int]:
    """Voxels per value, leaving out ``ignore_value`` and negative values."""
    values, counts = np.unique(np.asarray(seg), return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts) if v >= 0 and v != ignore_value}
