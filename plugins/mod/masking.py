"""Masking M(·) (paper §III "blockwise masking", §IV-B "mask rate of 0.6"; spec 002 §2.2).

Masks live on the **token grid** of the token stage (``backbone.choose_token_stage``): one token = one block of
``stride`` voxels (16³ for the paper's ViT hosts). Every sample and view gets exactly ``round(ratio · T)`` masked
tokens (T = tokens per patch), in one of two modes:

``block``  (default) BEiT/iBOT block-wise masking generalised to 3D: cuboids of adjacent tokens with a random volume
           (at least ``min_block`` tokens) and random aspect ratios in [min_aspect, 1/min_aspect] are added until
           no further block fits the remaining budget; the rest of the budget is filled with random single tokens,
           so the count is exact (BEiT's generator may stop short of it).
``random`` a uniformly random subset of the tokens (§IV-B "random masking").

Masking happens in input space (a CNN has no patch embedding): x̂ = (1 − M)·x + M·t with a learnable mask token
t ∈ R^{C_in} (init 0 = the mean of nnU-Net's z-scored intensities), M the token mask upsampled to voxels.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

MASK_MODES = ("block", "random")


def num_masked(num_tokens: int, ratio: float) -> int:
    """round(ratio · T), halves rounded up, within [0, T]."""
    return int(min(max(math.floor(ratio * num_tokens + 0.5), 0), num_tokens))


def random_token_mask(grid: Sequence[int], ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask over ``grid`` with exactly ``num_masked(prod(grid), ratio)`` True, uniformly at random."""
    t = int(np.prod(grid))
    m = np.zeros(t, dtype=bool)
    m[rng.choice(t, num_masked(t, ratio), replace=False)] = True
    return m.reshape(tuple(grid))


def block_token_mask(grid: Sequence[int], ratio: float, rng: np.random.Generator, min_block: int = 4,
                     min_aspect: float = 0.3, attempts: int = 10) -> np.ndarray:
    """Block-wise mask over an N-d token grid with exactly ``num_masked(T, ratio)`` True (see module docstring)."""
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    t = int(np.prod(grid))
    target = num_masked(t, ratio)
    mask = np.zeros(grid, dtype=bool)
    count = 0
    log_lo, log_hi = math.log(min_aspect), -math.log(min_aspect)
    while count < target:
        budget = target - count
        added = 0
        for _ in range(attempts):
            lo = min(min_block, budget)
            vol = rng.uniform(lo, budget) if budget > lo else float(budget)
            u = rng.uniform(log_lo, log_hi, size=nd)
            u -= u.mean()  # product of the side factors is 1: the block volume is ~vol
            side = [int(min(max(round(vol ** (1.0 / nd) * math.exp(ui)), 1), g)) for ui, g in zip(u, grid)]
            start = [int(rng.integers(0, g - s + 1)) for s, g in zip(side, grid)]
            sl = tuple(slice(a, a + s) for a, s in zip(start, side))
            new = int(np.prod(side)) - int(mask[sl].sum())
            if 0 < new <= budget:
                mask[sl] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < target:  # top up with random single tokens: the count is exact
        free = np.flatnonzero(~mask.reshape(-1))
        extra = rng.choice(free, target - count, replace=False)
        flat = mask.reshape(-1)
        flat[extra] = True
        mask = flat.reshape(grid)
    return mask


def token_masks(batch: int, grid: Sequence[int], ratio: float, rng: np.random.Generator, mode: str = "block",
                min_block: int = 4, min_aspect: float = 0.3, device=None) -> torch.Tensor:
    """(batch, *grid) bool masks, one independent mask per sample."""
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")
    if mode == "block":
        ms = [block_token_mask(grid, ratio, rng, min_block, min_aspect) for _ in range(batch)]
    else:
        ms = [random_token_mask(grid, ratio, rng) for _ in range(batch)]
    return torch.from_numpy(np.stack(ms)).to(device)


def masked_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, *grid) bool masks with the same count per sample -> (B, n) long indices of the masked tokens (row-major
    grid order, ascending)."""
    flat = mask.reshape(mask.shape[0], -1)
    counts = flat.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every sample must have the same number of masked tokens")
    return torch.nonzero(flat, as_tuple=False)[:, 1].reshape(flat.shape[0], int(counts[0]))


def upsample_mask(mask: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """(B, *grid) token mask -> (B, 1, *grid·stride) float voxel mask, constant within each stride block."""
    m = mask.float()
    for axis, s in enumerate(stride):
        if s > 1:
            m = m.repeat_interleave(int(s), dim=axis + 1)
    return m.unsqueeze(1)


def apply_mask(x: torch.Tensor, voxel_mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """x̂ = (1 − M)·x + M·t; ``mask_token`` (1, C, 1, ...) is learnable, so the graph keeps its gradient."""
    return x * (1.0 - voxel_mask) + voxel_mask * mask_token.to(x.dtype)


__all__ = ["MASK_MODES", "num_masked", "random_token_mask", "block_token_mask", "token_masks", "masked_token_index",
           "upsample_mask", "apply_mask"]
