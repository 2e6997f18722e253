"""Feature taps and projector heads of MCSC / MCSCv2 (spec §4.2, §7.2) — training-only modules, outside the
inference network.

* **Taps**: forward hooks on decoder stages of each network. Scale ``full`` = the finest decoder stage (nnU-Net:
  the last decoder stage, full resolution; U-Net 16 ch in the thesis), scale ``coarse`` = the decoder stage whose
  cumulative in-plane stride is closest to ``coarse_stride`` (thesis: the first decoder stage at 1/8). The choice is
  made once from a dry forward pass at the patch size and logged.
* **Projectors** (one per scale, spec: "two projectors per branch, the two branches share only the last layer"):
  ``1×1 conv (C_net → 256) → ReLU → 1×1 conv (256 → 128)`` with the last conv shared by both networks; features are
  L2-normalised. Applied to gathered voxels only (a 1×1 conv acts per voxel). The second network's features go through a channel LayerNorm first when it is the CS-Unet (the
  MCSC code normalises the Swin tokens before projecting).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCALES = ("full", "coarse")


def candidate_modules(net: nn.Module) -> Tuple[List[nn.Module], bool]:
    """Modules whose outputs are decoder feature maps, and whether those are channel-last (B, *spatial, C).
    nnU-Net's U-Nets: ``decoder.stages`` (B, C, *spatial). CS-Unet: the decoder's CST layers, then its two patch
    expansions (channel-last tokens)."""
    dec = getattr(net, "decoder", None)
    if dec is not None and hasattr(dec, "expand0") and hasattr(dec, "layers"):
        return list(dec.layers) + [dec.expand1, dec.expand0], True
    stages = getattr(dec, "stages", None)
    if stages is None:
        raise ValueError(f"{type(net).__name__} exposes no decoder stages (decoder.stages) to take features from")
    return list(stages), False


def as_map(o, channels_last: bool) -> torch.Tensor:
    """A hooked output as a (B, C, *spatial) map."""
    o = o[0] if isinstance(o, (list, tuple)) else o
    return o.movedim(-1, 1) if channels_last else o


@torch.no_grad()
def probe_taps(net: nn.Module, example: torch.Tensor, coarse_stride: int) -> Dict[str, Tuple[int, int, Tuple[int, ...]]]:
    """``{scale: (candidate index, channels, stride per axis)}`` from one forward pass of ``example``: ``full`` =
    the finest decoder output, ``coarse`` = the one whose in-plane stride is closest to ``coarse_stride``."""
    cands, last = candidate_modules(net)
    shapes: Dict[int, Tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: shapes.__setitem__(k, tuple(as_map(o, last).shape)))
             for k, m in enumerate(cands)]
    was = net.training
    net.eval()
    try:
        net(example)
    finally:
        for h in hooks:
            h.remove()
        net.train(was)
    spatial = example.shape[2:]
    info = []
    for k, s in sorted(shapes.items()):
        stride = tuple(int(round(a / b)) for a, b in zip(spatial, s[2:]))
        info.append((k, s[1], stride))
    if not info:
        raise ValueError(f"no decoder stage of {type(net).__name__} ran in the forward pass")

    def inplane(st):
        return max(st[-2:]) if len(st) > 1 else st[0]

    full = min(info, key=lambda t: (max(t[2]), -t[0]))
    coarse = min(info, key=lambda t: (abs(np.log2(inplane(t[2])) - np.log2(coarse_stride)), -inplane(t[2])))
    return {"full": full, "coarse": coarse}


class FeatureTaps:
    """Forward hooks that keep the outputs of chosen modules while ``capture`` is on."""

    def __init__(self):
        self.capture = False
        self.store: Dict[str, torch.Tensor] = {}
        self._handles = []
        self._owner = None

    def attach(self, owner: nn.Module, modules: Dict[str, nn.Module], channels_last: bool = False) -> None:
        self.detach()
        self._owner = owner
        for name, m in modules.items():
            self._handles.append(m.register_forward_hook(
                lambda mod, i, o, name=name: self.store.__setitem__(name, as_map(o, channels_last))
                if self.capture else None))

    def attached_to(self, owner: nn.Module) -> bool:
        return self._owner is owner and bool(self._handles)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._owner = None


class Projectors(nn.Module):
    """Per scale: ``head_a[scale]``, ``head_b[scale]`` (1×1 conv → ReLU) and the shared ``last[scale]`` (1×1 conv).

    A 1×1 convolution is a linear map of each voxel's channel vector, so the projectors are applied to gathered
    voxel features ``(n, C)`` only (:meth:`project`): MCSC needs the voxels of its sampled blocks, MCSCv2 its anchors
    and bank candidates, never the whole projected map (which would cost 256 channels × every voxel of 2 × (B_l +
    B_u) patches)."""

    def __init__(self, channels_a: Dict[str, int], channels_b: Dict[str, int], hidden: int = 256,
                 out_dim: int = 128, norm_b: bool = False):
        super().__init__()
        self.scales = list(channels_a)
        self.head_a = nn.ModuleDict({s: nn.Sequential(nn.Linear(channels_a[s], hidden), nn.ReLU(inplace=True))
                                     for s in self.scales})
        self.head_b = nn.ModuleDict({s: nn.Sequential(*([nn.LayerNorm(channels_b[s])] if norm_b else []),
                                                      nn.Linear(channels_b[s], hidden), nn.ReLU(inplace=True))
                                     for s in self.scales})
        self.last = nn.ModuleDict({s: nn.Linear(hidden, out_dim) for s in self.scales})
        self.out_dim = int(out_dim)

    def project(self, scale: str, net: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., C) voxel features of network ``net`` ('a' or 'b') -> L2-normalised (..., out_dim)."""
        head = self.head_a[scale] if net == "a" else self.head_b[scale]
        z = self.last[scale](head(x.float()))   # float32 (the trainer computes L_cl outside autocast)
        return F.normalize(z.float(), dim=-1)


def gather_voxels(fmap: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``fmap`` (B, C, *S), ``positions`` (B, ...) flat voxel indices -> (B, ..., C)."""
    b, c = fmap.shape[:2]
    flat = fmap.reshape(b, c, -1)
    idx = positions.reshape(b, 1, -1).expand(b, c, -1)
    out = torch.gather(flat, 2, idx)                     # (B, C, n)
    return out.permute(0, 2, 1).reshape(*positions.shape, c)


@torch.no_grad()
def stream_projections(project: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, labels: torch.Tensor,
                       is_mean: torch.Tensor, keep: torch.Tensor, num_classes: int, dim: int,
                       chunk: int = 65536, keep_dtype: torch.dtype = torch.float32
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One no-grad pass of ``project`` over the sorted unique voxel indices ``idx`` (in chunks of ``chunk``):

    * class sums of the projections of the voxels with ``is_mean`` (per voxel of ``idx``), grouped by ``labels``
      (per voxel of ``idx``): (num_classes, dim), and their counts (num_classes,);
    * the projections of the voxels ``keep`` (sorted unique, a subset of ``idx``): (len(keep), dim), in
      ``keep_dtype`` (MCSCv2: its banks' float16).

    Each voxel is projected once however many classes need it (as a positive's member and as a negative candidate of
    several classes), and only the kept rows are held, never the whole projected map."""
    sums = torch.zeros(num_classes, dim, dtype=torch.float32, device=idx.device)
    counts = torch.bincount(labels[is_mean], minlength=num_classes)[:num_classes]
    kept = torch.empty(keep.numel(), dim, dtype=keep_dtype, device=idx.device)
    where = torch.searchsorted(idx, keep)  # positions of the kept voxels in idx
    for start in range(0, idx.numel(), chunk):
        stop = min(start + chunk, idx.numel())
        z = project(idx[start:stop]).float()
        m = is_mean[start:stop]
        if m.any():
            sums.index_add_(0, labels[start:stop][m], z[m])
        lo, hi = torch.searchsorted(where, torch.tensor([start, stop], device=where.device)).tolist()
        if hi > lo:
            kept[lo:hi] = z[where[lo:hi] - start].to(keep_dtype)
    return sums, counts, kept
