"""Window partition, cyclic shift and the (shifted-)window attention mask, in 2D or 3D (spec §3.2, §3.7).

Tokens are channel-last maps ``(B, *S, C)`` (``S`` = (D, H, W) or (H, W)). A window is ``w = (w_1, .., w_n)``
tokens; a shift ``s`` (per axis, 0 = none) is the cyclic roll by ``-s`` applied before the partition (Swin's
SW-MSA; Video-Swin's per-axis rule: no shift on an axis the window already covers).

**Grids that are not a multiple of the window are padded** (zeros at the end of each axis, after the block's
LayerNorm, as Swin does) and the padded tokens are **masked as keys**; their attention outputs are zeroed before
the depthwise output projection, so real tokens see them exactly like the zero padding of a convolution at the
image border. The window itself is clamped to the token grid of the planned patch (``min(window, grid)`` per
axis) when the network is built (:func:`stage_window`); with ``fit='divide'`` it is instead reduced to the largest
divisor of the grid (no padding).

The attention mask lets token i attend to token j of the same window iff j is a real (not padded) token and i, j
come from the same contiguous region of the un-rolled grid (no wrap-around across the shift seam). The diagonal
is always allowed, so no softmax row is empty (padded queries attend to themselves; their output is discarded).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

Size = Tuple[int, ...]


def stage_window(window: int, grid: Sequence[int], fit: str = "pad") -> Size:
    """The window of a stage per axis (grid = token grid of the planned patch): ``min(window, grid)`` (``fit='pad'``,
    the grid is then padded to a multiple), or the largest divisor of the grid that is <= window
    (``fit='divide'``: no padding, smaller windows on grids such as 16 with window 7 -> 4)."""
    out = []
    for g in grid:
        w = max(1, min(int(window), int(g)))
        if fit == "divide":
            while int(g) % w:
                w -= 1
        elif fit != "pad":
            raise ValueError(f"window fit must be 'pad' or 'divide', got '{fit}'")
        out.append(w)
    return tuple(out)


def stage_shift(window: Sequence[int], grid: Sequence[int]) -> Size:
    """The SW shift of a stage: ``w // 2`` on axes the window does not cover, else 0 (Video-Swin rule)."""
    return tuple(int(w) // 2 if int(g) > int(w) else 0 for w, g in zip(window, grid))


def padded_size(size: Sequence[int], window: Sequence[int]) -> Size:
    return tuple(int(s) + (-int(s)) % int(w) for s, w in zip(size, window))


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """``(B, *S, C)`` with ``S`` divisible by ``window`` -> ``(B * nW, *window, C)``, windows in row-major order
    within each sample (index ``b * nW + w``)."""
    b, c, sp = x.shape[0], x.shape[-1], x.shape[1:-1]
    nd = len(sp)
    shape = [b]
    for s, w in zip(sp, window):
        shape += [s // w, w]
    x = x.reshape(*shape, c)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [2 * nd + 1]
    return x.permute(perm).reshape(-1, *window, c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], size: Sequence[int], batch: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, *window, C)`` -> ``(B, *size, C)``."""
    nd, c = len(size), windows.shape[-1]
    x = windows.reshape(batch, *[s // w for s, w in zip(size, window)], *window, c)
    perm = [0]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    perm += [2 * nd + 1]
    return x.permute(perm).reshape(batch, *size, c)


@functools.lru_cache(maxsize=64)
def _masks_cpu(size: Size, padded: Size, window: Size, shift: Size) -> Tuple[Optional[torch.Tensor],
                                                                           Optional[torch.Tensor]]:
    nd = len(size)
    if padded == size and not any(shift):
        return None, None
    # region labels on the rolled, padded grid (Swin's img_mask, per axis)
    region = torch.zeros(padded, dtype=torch.long)
    for ax in range(nd):
        w, s, n = window[ax], shift[ax], padded[ax]
        bounds = [(0, n - w), (n - w, n - s), (n - s, n)] if s > 0 else [(0, n)]
        lab = torch.zeros(n, dtype=torch.long)
        for i, (a, b) in enumerate(bounds):
            lab[a:b] = i
        region = region * 3 + lab.view(*[n if d == ax else 1 for d in range(nd)])
    # real (not padded) tokens, rolled like the tokens
    valid = torch.ones(padded, dtype=torch.bool)
    for ax in range(nd):
        idx = torch.arange(padded[ax]) < size[ax]
        valid = valid & idx.view(*[padded[ax] if d == ax else 1 for d in range(nd)])
    if any(shift):
        dims = tuple(range(nd))
        valid = torch.roll(valid, shifts=tuple(-s for s in shift), dims=dims)
    reg_w = window_partition(region[None, ..., None], window)[..., 0].flatten(1)  # (nW, N)
    val_w = window_partition(valid[None, ..., None], window)[..., 0].flatten(1)   # (nW, N)
    allowed = (reg_w[:, :, None] == reg_w[:, None, :]) & val_w[:, None, :]
    allowed = allowed | torch.eye(allowed.shape[-1], dtype=torch.bool)[None]
    return allowed, val_w


def attention_masks(size: Sequence[int], window: Sequence[int], shift: Sequence[int],
                    device: torch.device) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(allowed, valid)`` for a token grid ``size`` (before padding): ``allowed`` (nW, N, N) bool, True where
    query i may attend to key j; ``valid`` (nW, N) bool, True for real tokens. ``(None, None)`` when there is
    neither padding nor shift (plain W-MSA)."""
    size, window, shift = tuple(map(int, size)), tuple(map(int, window)), tuple(map(int, shift))
    return _masks_on(size, padded_size(size, window), window, shift, str(torch.device(device)))


@functools.lru_cache(maxsize=32)
def _masks_on(size: Size, padded: Size, window: Size, shift: Size, device: str):
    """The masks on ``device``, cached (no host-to-device copy per block and step)."""
    allowed, valid = _masks_cpu(size, padded, window, shift)
    if allowed is None or device == "cpu":
        return allowed, valid
    return allowed.to(device), valid.to(device)


__all__ = ["stage_window", "stage_shift", "padded_size", "window_partition", "window_reverse", "attention_masks"]
