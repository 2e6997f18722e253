"""The host's backbone f_θ (spec 002 §2.1, §7): nnU-Net's encoder, and the stage whose feature map gives MOD's tokens.

The paper reads "the backbone's output feature map" f_θ^efm; for its ViT hosts that is the grid of 16³-voxel tokens.
A CNN encoder has no single token grid, so MOD uses the encoder stage whose cumulative stride is closest to
``token_stride`` (16, as the ViT patch) per axis (spec §7, "Token stage (ours)"). Each position of that stage's
feature map is one patch token; its global average is the classification token.

The student runs the clean batch and the two masked views through the encoder *in one batch* up to the token stage
(InstanceNorm normalises per sample, so batching changes nothing), and only the clean batch through the deeper
stages and the decoder: the views are never segmented.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn


def unwrap(network: nn.Module) -> nn.Module:
    """The plain network inside DDP / torch.compile wrappers."""
    mod = network
    while True:
        if hasattr(mod, "module") and isinstance(getattr(mod, "module"), nn.Module):
            mod = mod.module
        elif hasattr(mod, "_orig_mod"):
            mod = mod._orig_mod
        else:
            return mod


def encoder_of(network: nn.Module) -> nn.Module:
    net = unwrap(network)
    if not hasattr(net, "encoder"):
        raise TypeError(f"{type(net).__name__} has no 'encoder': MOD needs an nnU-Net style encoder-decoder network")
    return net.encoder


def _as_tuple(s, ndim: int) -> Tuple[int, ...]:
    if isinstance(s, int):
        return (s,) * ndim
    return tuple(int(i) for i in s)


def cumulative_strides(encoder: nn.Module, ndim: int) -> List[Tuple[int, ...]]:
    """Cumulative stride (per axis) of every encoder stage's output, stem included."""
    strides = getattr(encoder, "strides", None)
    if strides is None:
        raise TypeError(f"{type(encoder).__name__} has no 'strides': cannot locate the token stage")
    acc = [1] * ndim
    out = []
    for s in strides:
        acc = [a * b for a, b in zip(acc, _as_tuple(s, ndim))]
        out.append(tuple(acc))
    return out


def stage_channels(encoder: nn.Module) -> List[int]:
    ch = getattr(encoder, "output_channels", None)
    if ch is None:
        raise TypeError(f"{type(encoder).__name__} has no 'output_channels'")
    return [int(c) for c in ch]


def choose_token_stage(encoder: nn.Module, ndim: int, target_stride: int = 16, stage: int = -1) -> int:
    """``stage`` if >= 0, else the stage whose cumulative stride is closest to ``target_stride`` on every axis
    (smallest mean |log2(stride_axis / target)|; ties go to the deeper stage)."""
    cum = cumulative_strides(encoder, ndim)
    if stage >= 0:
        if stage >= len(cum):
            raise ValueError(f"token stage {stage} does not exist (the encoder has {len(cum)} stages)")
        return stage
    t = math.log2(target_stride)
    cost = [sum(abs(math.log2(a) - t) for a in c) / ndim for c in cum]
    best = min(cost)
    return max(i for i, c in enumerate(cost) if abs(c - best) < 1e-9)


def token_grid(patch_size: Sequence[int], stride: Sequence[int]) -> Tuple[int, ...]:
    """Token grid of a patch; the patch must be divisible by the stride (nnU-Net patches always are)."""
    for p, s in zip(patch_size, stride):
        if p % s:
            raise ValueError(f"patch size {tuple(patch_size)} is not divisible by the token stride {tuple(stride)}")
    return tuple(int(p) // int(s) for p, s in zip(patch_size, stride))


def _stages(encoder: nn.Module):
    stages = getattr(encoder, "stages", None)
    if stages is None:
        raise TypeError(f"{type(encoder).__name__} has no 'stages'")
    return stages


def run_to_stage(encoder: nn.Module, x: torch.Tensor, stage: int) -> torch.Tensor:
    """Output of encoder stage ``stage`` (stem and stages ``0..stage``; the deeper stages are not run)."""
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        x = stem(x)
    for s in _stages(encoder)[: stage + 1]:
        x = s(x)
    return x


def split_forward(encoder: nn.Module, x: torch.Tensor, views: Optional[torch.Tensor], stage: int,
                  chunk: Optional[int] = None):
    """Encoder on ``cat([x, views])`` up to ``stage``, deeper stages on ``x`` only.

    Returns ``(skips, tokens)``: the skip list of ``x`` exactly as ``encoder(x)`` returns it (for the decoder), and
    the token-stage feature map of ``views`` (None without views).

    ``chunk`` None: one pass over the concatenated batch (best on a GPU). ``chunk`` = n: ``x`` alone through the
    whole encoder, then the views up to ``stage`` in passes of n samples. The result is identical for per-sample
    normalisation (nnU-Net's InstanceNorm); on a CPU the passes at the stock batch size avoid the cache misses of
    a batch three times larger (MOD README, "Cost")."""
    if views is None:
        return encoder(x), None
    if chunk:
        skips = encoder(x)
        tokens = torch.cat([run_to_stage(encoder, v, stage) for v in views.split(int(chunk))], 0)
        return skips, tokens
    b = x.shape[0]
    h = torch.cat([x, views], 0)
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        h = stem(h)
    skips, tokens = [], None
    for i, s in enumerate(_stages(encoder)):
        h = s(h)
        if tokens is None:
            skips.append(h[:b])
            if i == stage:
                tokens = h[b:]
                h = h[:b]
        else:
            skips.append(h)
    if not getattr(encoder, "return_skips", True):
        return skips[-1], tokens
    return skips, tokens


class TeacherBackbone(nn.Module):
    """A copy of the student encoder's stem and stages ``0..stage`` (the deeper stages give no tokens, so the teacher
    neither holds nor runs them). Parameter names match the student encoder's (``stem.*``, ``stages.i.*``)."""

    def __init__(self, encoder: nn.Module, stage: int):
        super().__init__()
        import copy
        stem = getattr(encoder, "stem", None)
        self.stem = copy.deepcopy(stem) if stem is not None else None
        self.stages = nn.Sequential(*[copy.deepcopy(s) for s in _stages(encoder)[: stage + 1]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        return self.stages(x)


__all__ = ["unwrap", "encoder_of", "cumulative_strides", "stage_channels", "choose_token_stage", "token_grid",
           "run_to_stage", "split_forward", "TeacherBackbone"]
