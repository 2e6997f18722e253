"""The parts of CS-Unet (Liu 2025 thesis ch. 3, spec §3.2), lifted to 2D/3D.

Token maps inside the Transformer are channel-last ``(B, *S, C)``; convolutions permute to channel-first.

* :class:`ConvEmbedding`   convolutional token embedding (replaces the linear patch embedding): conv s1 -> d/2,
  GELU -> conv (stride a) -> d/2, GELU, LN -> conv s1 -> d, GELU -> conv (stride b) -> d, GELU [-> dropout, LN,
  code]; a, b = the plan's first two down-sampling strides.
* :class:`ConvWindowAttention`  W-CMSA / SW-CMSA (Eq. 3.5 without a position bias): per window, Q, K, V each from
  their own depthwise 3^n conv (no bias) -> flatten -> LN; ``softmax(QK^T/sqrt(d_h) + mask) V``; output projection
  = depthwise 3^n conv + GELU [code]. No pointwise projections, no positional embedding or bias table.
* :class:`DSF`              depthwise separable feed-forward: DWConv k^n -> LN -> Linear d->4d (= pointwise conv)
  -> GELU -> Linear 4d->d -> LayerScale.
* :class:`CSTBlock`         Eq. 3.1-3.4: z^ = (S)W-CMSA(LN(z)) + z; z = DSF(z^) + z^ (with stochastic depth).
* :class:`PatchMerging`     concatenation of the ``stride`` neighbourhood (prod(stride)*C) -> LN -> Linear -> C'.
* :class:`UpSkip`           decoder stage entry: LN -> ConvTranspose(kernel = stride) d' -> d -> GELU [-> dropout];
  concatenation with the encoder skip; Skip-Convolution (conv 2d -> d, GELU, conv d -> d, GELU [-> dropout]).
* :class:`PatchExpand`      head up-sampling: ConvTranspose(kernel = stride) -> LN (== the code's Linear expansion
  + pixel shuffle + LN, for any per-axis stride).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .windows import attention_masks, padded_size, window_partition, window_reverse


def conv_nd(nd: int):
    return {2: nn.Conv2d, 3: nn.Conv3d}[nd]


def conv_transpose_nd(nd: int):
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    nd = x.ndim - 2
    return x.permute(0, nd + 1, *range(1, nd + 1))


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    nd = x.ndim - 2
    return x.permute(0, *range(2, nd + 2), 1)


def _pad(k: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(i) // 2 for i in k)


class DropPath(nn.Module):
    """Stochastic depth (per sample), as in Swin."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class ConvEmbedding(nn.Module):
    """Convolutional token embedding: image ``(B, C_in, *P)`` -> tokens ``(B, *P / (a*b), d)``."""

    def __init__(self, nd: int, in_ch: int, mid: int, dim: int, stride_a, stride_b, k0, k1, k2, dropout: float):
        super().__init__()
        conv = conv_nd(nd)
        self.conv1 = conv(in_ch, mid, k0, 1, _pad(k0))
        self.conv2 = conv(mid, mid, k1, tuple(stride_a), _pad(k1))
        self.norm2 = nn.LayerNorm(mid)
        self.conv3 = conv(mid, dim, k1, 1, _pad(k1))
        self.conv4 = conv(dim, dim, k2, tuple(stride_b), _pad(k2))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = to_channels_first(self.norm2(to_channels_last(x)))
        x = F.gelu(self.conv3(x))
        x = F.gelu(self.conv4(x))
        return self.norm(self.drop(to_channels_last(x)))


class ConvWindowAttention(nn.Module):
    """W-CMSA on windows ``(B*nW, *w, C)`` (see the module docstring)."""

    def __init__(self, nd: int, dim: int, heads: int, window: Sequence[int]):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.window = dim, heads, tuple(int(w) for w in window)
        k = tuple(3 if w > 1 else 1 for w in self.window)  # 3^n within the window (1 on a one-token axis)
        conv = conv_nd(nd)
        self.q = conv(dim, dim, k, 1, _pad(k), groups=dim, bias=False)
        self.k = conv(dim, dim, k, 1, _pad(k), groups=dim, bias=False)
        self.v = conv(dim, dim, k, 1, _pad(k), groups=dim, bias=False)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.proj = conv(dim, dim, k, 1, _pad(k), groups=dim)
        self.explicit = False  # True: softmax(QK^T) computed explicitly (tests); else scaled_dot_product_attention
        self.last_attention: Optional[torch.Tensor] = None  # filled in explicit mode when keep_attention is set
        self.keep_attention = False

    def qkv(self, win: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Bw, *w, C)`` -> q, k, v each ``(Bw, heads, N, C/heads)``."""
        bw, c = win.shape[0], win.shape[-1]
        xc = to_channels_first(win)
        out = []
        for conv, norm in ((self.q, self.norm_q), (self.k, self.norm_k), (self.v, self.norm_v)):
            t = norm(conv(xc).flatten(2).transpose(1, 2))  # (Bw, N, C)
            out.append(t.reshape(bw, -1, self.heads, c // self.heads).transpose(1, 2))
        return out[0], out[1], out[2]

    def forward(self, win: torch.Tensor, allowed: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                batch: int) -> torch.Tensor:
        bw, c = win.shape[0], win.shape[-1]
        q, k, v = self.qkv(win)
        n = q.shape[2]
        mask = None
        if allowed is not None:  # (nW, N, N) -> (B*nW, 1, N, N) in the window order of window_partition
            mask = allowed[None].expand(batch, *allowed.shape).reshape(bw, 1, n, n)
        if self.explicit:
            attn = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            attn = attn.softmax(-1)
            if self.keep_attention:
                self.last_attention = attn.detach()
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(bw, n, c)
        if valid is not None:  # padded tokens: zero, like the convolution's own zero padding
            vm = valid[None].expand(batch, *valid.shape).reshape(bw, n, 1)
            out = out * vm.to(out.dtype)
        out = out.transpose(1, 2).reshape(bw, c, *self.window)
        return to_channels_last(F.gelu(self.proj(out)))


class DSF(nn.Module):
    """Depthwise separable feed-forward: DWConv -> LN -> PW(4d) -> GELU -> PW(d) -> LayerScale (no residual here)."""

    def __init__(self, nd: int, dim: int, kernel: Sequence[int], mlp_ratio: float, layer_scale: float):
        super().__init__()
        k = tuple(int(i) for i in kernel)
        self.dwconv = conv_nd(nd)(dim, dim, k, 1, _pad(k), groups=dim)
        self.norm = nn.LayerNorm(dim)
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.pw1 = nn.Linear(dim, hidden)
        self.pw2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale))) if layer_scale > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_channels_last(self.dwconv(to_channels_first(x)))
        x = self.pw2(F.gelu(self.pw1(self.norm(x))))
        return x * self.gamma if self.gamma is not None else x


class CSTBlock(nn.Module):
    """One CST block: (S)W-CMSA then DSF, each with a residual (Eq. 3.1-3.4)."""

    def __init__(self, nd: int, dim: int, heads: int, window, shift, dsf_kernel, mlp_ratio: float,
                 layer_scale: float, drop_path: float):
        super().__init__()
        self.window = tuple(int(w) for w in window)
        self.shift = tuple(int(s) for s in shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvWindowAttention(nd, dim, heads, self.window)
        self.dsf = DSF(nd, dim, dsf_kernel, mlp_ratio, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, size = x.shape[0], tuple(x.shape[1:-1])
        nd = len(size)
        y = self.norm1(x)
        padded = padded_size(size, self.window)
        if padded != size:
            pad = []
            for s, p in zip(reversed(size), reversed(padded)):
                pad += [0, p - s]
            y = F.pad(y, [0, 0] + pad)
        dims = tuple(range(1, nd + 1))
        if any(self.shift):
            y = torch.roll(y, shifts=tuple(-s for s in self.shift), dims=dims)
        allowed, valid = attention_masks(size, self.window, self.shift, x.device)
        y = self.attn(window_partition(y, self.window), allowed, valid, b)
        y = window_reverse(y, self.window, padded, b)
        if any(self.shift):
            y = torch.roll(y, shifts=self.shift, dims=dims)
        if padded != size:
            y = y[(slice(None),) + tuple(slice(0, s) for s in size)]
        x = x + self.drop_path(y)
        return x + self.drop_path(self.dsf(x))


class CSTLayer(nn.Module):
    """``depth`` CST blocks alternating W-CMSA (even) and SW-CMSA (odd)."""

    def __init__(self, nd: int, dim: int, depth: int, heads: int, window, shift, dsf_kernel, mlp_ratio: float,
                 layer_scale: float, drop_paths: Sequence[float]):
        super().__init__()
        self.blocks = nn.ModuleList([
            CSTBlock(nd, dim, heads, window, shift if i % 2 else (0,) * nd, dsf_kernel, mlp_ratio, layer_scale,
                     drop_paths[i]) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


class PatchMerging(nn.Module):
    """Concatenate each ``stride`` neighbourhood (prod(stride)*C) -> LN -> Linear (no bias) -> ``out_dim``."""

    def __init__(self, dim: int, out_dim: int, stride: Sequence[int]):
        super().__init__()
        self.stride = tuple(int(s) for s in stride)
        r = 1
        for s in self.stride:
            r *= s
        self.norm = nn.LayerNorm(r * dim)
        self.reduction = nn.Linear(r * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, size = x.shape[0], x.shape[-1], x.shape[1:-1]
        nd = len(size)
        shape = [b]
        for n, s in zip(size, self.stride):
            shape += [n // s, s]
        x = x.reshape(*shape, c)
        perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [2 * nd + 1]
        x = x.permute(perm).reshape(b, *[n // s for n, s in zip(size, self.stride)], -1)
        return self.reduction(self.norm(x))


class UpSkip(nn.Module):
    """Decoder stage entry: conv up-sampling, concatenation with the skip, Skip-Convolution (SC)."""

    def __init__(self, nd: int, in_dim: int, dim: int, stride, kernel, dropout: float):
        super().__init__()
        st = tuple(int(s) for s in stride)
        k = tuple(int(i) for i in kernel)
        self.norm = nn.LayerNorm(in_dim)
        self.up = conv_transpose_nd(nd)(in_dim, dim, st, st)
        self.drop_up = nn.Dropout(dropout)
        conv = conv_nd(nd)
        self.sc1 = conv(2 * dim, dim, k, 1, _pad(k))
        self.sc2 = conv(dim, dim, k, 1, _pad(k))
        self.drop_sc = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.drop_up(F.gelu(self.up(to_channels_first(self.norm(x)))))
        x = torch.cat((x, to_channels_first(skip)), 1)
        x = F.gelu(self.sc2(F.gelu(self.sc1(x))))
        return to_channels_last(self.drop_sc(x))


class PatchExpand(nn.Module):
    """Head up-sampling by ``stride``: ConvTranspose(kernel = stride) -> LN (tokens in, tokens out)."""

    def __init__(self, nd: int, in_dim: int, dim: int, stride):
        super().__init__()
        st = tuple(int(s) for s in stride)
        self.up = conv_transpose_nd(nd)(in_dim, dim, st, st, bias=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_channels_last(self.up(to_channels_first(x))))


__all__ = ["ConvEmbedding", "ConvWindowAttention", "DSF", "CSTBlock", "CSTLayer", "PatchMerging", "UpSkip",
           "PatchExpand", "DropPath", "to_channels_first", "to_channels_last", "conv_nd"]
