"""Trainable MOD modules of the student (all outside ``self.network``; spec 002 §2.3, §2.4, §7).

Online tokenizer head h (paper: UNSPECIFIED; iBOT defaults, spec §2.3)
    3-layer MLP  C_tok → 2048 → 2048 → 256 (GELU, no norm), L2 normalisation, then a weight-normalised linear layer
    256 → K (K = 8192) with the norm fixed to 1 (iBOT ``norm_last_layer=True``). The MLP is shared by the
    classification token (global average of the token-stage map) and the patch tokens (one per position); the last
    layer is shared too by default (``shared_head``; iBOT's teacher), or a second one serves the patch tokens.

Dense predictor (paper: "lightweight" decoder, "linear vectors that correspond to the positional encoding")
    SimMIM-style: a 1×1×1 convolution C_tok → C_in·∏stride per token, then a pixel shuffle ("unpatchify") back to
    the input size, i.e. each token predicts the voxels of its own block.

Mask token t ∈ R^{C_in} (``masking.apply_mask``), init 0.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class NormedLinear(nn.Module):
    """Weight-normalised linear layer without bias: W = g · v / ‖v‖ (per output row), g fixed to 1 unless
    ``learn_norm``; equivalent to iBOT's ``weight_norm(Linear)`` with ``weight_g`` filled with 1."""

    def __init__(self, in_features: int, out_features: int, learn_norm: bool = False):
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=False)  # PyTorch's default init, as iBOT's last layer
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=learn_norm) if learn_norm else None

    def weight(self) -> torch.Tensor:
        w = self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return w * self.weight_g if self.weight_g is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)  # iBOT: trunc_normal_(std=.02), cut at ±2 std
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ProjectionHead(nn.Module):
    """iBOT head. ``forward(cls (N, C), patch (M, C)) -> (cls logits (N, K), patch logits (M, K))``."""

    def __init__(self, in_dim: int, out_dim: int = 8192, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, shared_head: bool = True, norm_last_layer: bool = True):
        super().__init__()
        self.config = dict(in_dim=int(in_dim), out_dim=int(out_dim), hidden_dim=int(hidden_dim),
                           bottleneck_dim=int(bottleneck_dim), nlayers=int(nlayers), shared_head=bool(shared_head),
                           norm_last_layer=bool(norm_last_layer))
        nlayers = max(int(nlayers), 1)
        if nlayers == 1:
            layers = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_trunc_normal_init)
        self.last_layer = NormedLinear(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)
        self.last_layer2 = None if shared_head else NormedLinear(bottleneck_dim, out_dim,
                                                                 learn_norm=not norm_last_layer)

    def last_layers(self):
        return [m for m in (self.last_layer, self.last_layer2) if m is not None]

    def forward(self, cls: torch.Tensor, patch: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        n = cls.shape[0]
        z = F.normalize(self.mlp(torch.cat([cls, patch], 0)), dim=-1, p=2)
        patch_layer = self.last_layer2 if self.last_layer2 is not None else self.last_layer
        return self.last_layer(z[:n]), patch_layer(z[n:])


def tokens_and_cls(feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token-stage map (B, C, *grid) -> (patch tokens (B·T, C) in grid order, cls tokens (B, C) = spatial mean)."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    return flat.transpose(1, 2).reshape(-1, c), flat.mean(-1)


def head_logits(head: ProjectionHead, feat: torch.Tensor,
                token_index: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cls logits (B, K), patch logits (B, T, K)) of a token-stage map, in float32. With ``token_index`` (B, n)
    only those tokens of each sample go through the head: patch logits (B, n, K). The student needs only its masked
    tokens (L_efm ignores the others), and every sample has the same number of them."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    cls = flat.mean(-1)
    patch = flat.transpose(1, 2)                                   # (B, T, C)
    if token_index is not None:
        patch = torch.gather(patch, 1, token_index.unsqueeze(-1).expand(-1, -1, c))
    n = patch.shape[1]
    lc, lp = head(cls, patch.reshape(-1, c))
    return lc.float(), lp.float().reshape(b, n, lp.shape[-1])


def pixel_shuffle_nd(x: torch.Tensor, out_channels: int, stride: Sequence[int]) -> torch.Tensor:
    """(B, C·∏s, *grid) -> (B, C, *(grid·s)); channel index = c·∏s + offset within the block (row-major)."""
    b = x.shape[0]
    grid = list(x.shape[2:])
    nd = len(grid)
    s = [int(i) for i in stride]
    x = x.reshape(b, out_channels, *s, *grid)
    # (B, C, s1..sn, g1..gn) -> (B, C, g1, s1, g2, s2, ...)
    perm = [0, 1]
    for i in range(nd):
        perm += [2 + nd + i, 2 + i]
    x = x.permute(*perm)
    return x.reshape(b, out_channels, *[g * si for g, si in zip(grid, s)])


class DensePredictor(nn.Module):
    """recon(v̂) from the token-stage map of v̂: 1×1×1 conv to C_in·∏stride, pixel shuffle to the input size."""

    def __init__(self, in_channels: int, out_channels: int, stride: Sequence[int]):
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        self.out_channels = int(out_channels)
        self.config = dict(in_channels=int(in_channels), out_channels=int(out_channels), stride=list(self.stride))
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.stride)]
        self.proj = conv(in_channels, out_channels * int(math.prod(self.stride)), kernel_size=1)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_nd(self.proj(feat), self.out_channels, self.stride)


class MODStudentModules(nn.Module):
    """Everything MOD trains besides the host network: mask token, projection head, dense predictor.
    A part is None when its loss is switched off (ablations), so every parameter here gets a gradient."""

    def __init__(self, in_channels: int, ndim: int, head: Optional[ProjectionHead],
                 dense_predictor: Optional[DensePredictor]):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, in_channels, *([1] * ndim)))
        self.head = head
        self.dense_predictor = dense_predictor


__all__ = ["NormedLinear", "ProjectionHead", "tokens_and_cls", "head_logits", "pixel_shuffle_nd", "DensePredictor",
           "MODStudentModules"]
