"""3D block grouping of MCSC (spec §4.2, §7.3) and nearest-neighbour resampling of label-like maps to a feature
scale.

MCSC divides each of the 2N feature maps (N images, two networks) into non-overlapping h′-blocks, shuffles the block
order independently per map, and forms group m from the m-th block of every map; L_bcl is computed per group and
averaged over the groups. In 3D a patch holds many blocks (a 128³ patch has 4096 blocks of 8³), so at most
``max_groups`` groups are used per iteration, chosen at random among the groups that are not entirely background
(the MCSC code skips all-background groups): a documented deviation from "all groups".
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def block_shape(spatial: Sequence[int], block: int) -> Tuple[int, ...]:
    """Per-axis block size ``min(block, size)``."""
    return tuple(max(1, min(int(block), int(s))) for s in spatial)


def to_blocks(x: torch.Tensor, block: Sequence[int], offset: Sequence[int]) -> torch.Tensor:
    """(M, C, *S) -> (M, n_blocks, prod(block), C): the non-overlapping blocks of the region starting at
    ``offset`` (blocks in raster order, voxels in raster order inside a block)."""
    m, c = x.shape[:2]
    spatial = x.shape[2:]
    nb = [s // b for s, b in zip(spatial, block)]
    sl = (slice(None), slice(None)) + tuple(slice(o, o + n * b) for o, n, b in zip(offset, nb, block))
    x = x[sl]
    shape = [m, c]
    for n, b in zip(nb, block):
        shape += [n, b]
    x = x.reshape(shape)
    d = len(block)
    # (M, C, n0, b0, n1, b1, ...) -> (M, n0, n1, ..., b0, b1, ..., C)
    perm = [0] + [2 + 2 * i for i in range(d)] + [3 + 2 * i for i in range(d)] + [1]
    x = x.permute(perm)
    n_blocks = 1
    for n in nb:
        n_blocks *= n
    vox = 1
    for b in block:
        vox *= b
    return x.reshape(m, n_blocks, vox, c)


def block_group_positions(labels: torch.Tensor, block: int, max_groups: int,
                          generator: Optional[torch.Generator] = None, background: int = 0
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """MCSC groups on label maps ``labels`` (M, *S) (< 0 = ignored voxel): ``(positions, group_labels)``, both
    (M, G, v): the flat voxel index (into ``S``) and label of the v voxels that map i contributes to group g. Map i
    contributes its ``perm_i[m]``-th block to group m (``perm_i`` an independent random permutation per map); at
    most ``max_groups`` groups, chosen at random among those with a voxel that is neither background nor ignored
    (G may be 0). The block grid starts at a random offset when the patch is not a multiple of the block."""
    m = labels.shape[0]
    spatial = labels.shape[1:]
    bs = block_shape(spatial, block)
    dev = labels.device
    offset = [int(torch.randint(0, s - (s // b) * b + 1, (1,), generator=generator).item())
              for s, b in zip(spatial, bs)]
    n_vox = 1
    for s in spatial:
        n_vox *= int(s)
    pos = torch.arange(n_vox, device=dev).view(1, 1, *spatial).expand(m, 1, *spatial)
    pb = to_blocks(pos, bs, offset)[..., 0]                      # (M, nb, v)
    lb = to_blocks(labels.unsqueeze(1), bs, offset)[..., 0]     # (M, nb, v)
    nb = pb.shape[1]
    perms = torch.stack([torch.randperm(nb, generator=generator) for _ in range(m)]).to(dev)  # (M, nb)
    rows = torch.arange(m, device=dev).view(-1, 1)
    g_lab = lb[rows, perms]                                     # (M, nb, v): group index on dim 1
    keep = ((g_lab != background) & (g_lab >= 0)).any(2).any(0)
    groups = torch.nonzero(keep).flatten()[: int(max_groups)]
    sel = perms[:, groups]                                      # (M, G)
    return pb[rows, sel], lb[rows, sel]


def resample_nearest(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of a label-like map (B, *S) or (B, C, *S) to ``size`` (voxel centres, as
    ``scipy.ndimage.zoom(order=0)`` in the MCSC code up to rounding)."""
    if tuple(x.shape[-len(size):]) == tuple(size):
        return x
    squeeze = x.ndim == len(size) + 1
    y = x.unsqueeze(1) if squeeze else x
    out = F.interpolate(y.float(), size=tuple(int(s) for s in size), mode="nearest")
    out = out.to(x.dtype)
    return out[:, 0] if squeeze else out


def mean_over_groups(losses: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not losses:
        return like.new_zeros(())
    return torch.stack(losses).mean()
