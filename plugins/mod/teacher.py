"""Online tokenizer, teacher side (paper §III-A.1, Alg. 1; spec 002 §2.3).

EMA teacher f_θ′ + h_θ′
    Same structure as the student backbone (up to the token stage, ``backbone.TeacherBackbone``) and head,
    initialised from the student, never in the optimizer, no gradients, eval mode. After every iteration
    θ′ ← m·θ′ + (1 − m)·θ over the parameters whose names teacher and student share (iBOT), with the cosine
    momentum schedule m_k = 1 − (1 − m_0)·(cos(πk/K) + 1)/2, k = 0..K−1, K = all training iterations
    (m_0 = 0.996 → 1; iBOT ``cosine_scheduler(0.996, 1, epochs, niter_per_ep)``). Buffers are copied.

Temperatures and centring (iBOT defaults; paper UNSPECIFIED)
    P_t = softmax((h_θ′(z) − c) / τ_t); τ_t = 0.04 for the cls token, and for patch tokens a linear warm-up
    0.04 → 0.07 over the first 30 epochs (``np.linspace`` including the end point, then constant).
    c ← λ_c·c + (1 − λ_c)·mean(teacher logits), λ_c = 0.9, over the batch (and tokens), all-reduced under DDP.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import distributed as dist
from torch import nn

from .backbone import TeacherBackbone
from .heads import ProjectionHead, head_logits


def cosine_momentum(it: int, total: int, base: float = 0.996, final: float = 1.0) -> float:
    """m_k = final + (base − final)·(1 + cos(π·k/K))/2 for k in [0, K); ``final`` from K on."""
    if total <= 0 or it >= total:
        return float(final)
    it = max(int(it), 0)
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * it / total)))


def teacher_patch_temperature(epoch: int, warmup_temp: float = 0.04, temp: float = 0.07,
                              warmup_epochs: int = 30) -> float:
    """Linear ``warmup_temp`` → ``temp`` over epochs 0..warmup_epochs−1 (end point included), then ``temp``
    (iBOT: ``np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs), np.ones(...) * temp))``)."""
    if epoch >= warmup_epochs:
        return float(temp)
    if warmup_epochs == 1:
        return float(warmup_temp)
    return float(warmup_temp + (temp - warmup_temp) * max(epoch, 0) / (warmup_epochs - 1))


class Centering(nn.Module):
    """Centres c_cls (1, K) and c_patch (1, K) of the teacher logits (buffers)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.register_buffer("cls", torch.zeros(1, out_dim))
        self.register_buffer("patch", torch.zeros(1, out_dim))

    @torch.no_grad()
    def update(self, teacher_cls: torch.Tensor, teacher_patch: torch.Tensor, momentum: float = 0.9) -> None:
        """``teacher_cls`` (N, K), ``teacher_patch`` (N, T, K): c ← m·c + (1 − m)·batch mean (iBOT: patch mean
        over tokens per image, then over images), averaged over DDP ranks."""
        cls_sum = teacher_cls.float().sum(0, keepdim=True)
        patch_sum = teacher_patch.float().mean(1).sum(0, keepdim=True)
        n = torch.tensor([float(teacher_cls.shape[0])], device=cls_sum.device)
        if dist.is_available() and dist.is_initialized():
            for t in (cls_sum, patch_sum, n):
                dist.all_reduce(t)
        self.cls.mul_(momentum).add_(cls_sum / n, alpha=1.0 - momentum)
        self.patch.mul_(momentum).add_(patch_sum / n, alpha=1.0 - momentum)


class EMATeacher(nn.Module):
    """f_θ′ (encoder stem + stages up to the token stage) and h_θ′; frozen, updated only by :meth:`ema_update`."""

    def __init__(self, encoder: nn.Module, token_stage: int, head: ProjectionHead):
        super().__init__()
        import copy
        self.backbone = TeacherBackbone(encoder, token_stage)
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always eval (InstanceNorm does not care, dropout would)
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, chunk: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(cls logits (B, K), patch logits (B, T, K)), float32, no gradient. ``chunk`` = n runs the backbone in
        passes of n samples (same result; see :func:`backbone.split_forward`)."""
        if chunk:
            feats = torch.cat([self.backbone(c) for c in x.split(int(chunk))], 0)
        else:
            feats = self.backbone(x)
        return head_logits(self.head, feats)

    def pairs(self, student_encoder: nn.Module, student_head: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(teacher tensor, student tensor) for every parameter name both share (iBOT's names_common)."""
        s_enc = dict(student_encoder.named_parameters())
        s_head = dict(student_head.named_parameters())
        out = []
        for name, p in self.backbone.named_parameters():
            if name in s_enc:
                out.append((p, s_enc[name]))
        for name, p in self.head.named_parameters():
            if name in s_head:
                out.append((p, s_head[name]))
        return out

    @torch.no_grad()
    def copy_from(self, student_encoder: nn.Module, student_head: nn.Module) -> None:
        for t, s in self.pairs(student_encoder, student_head):
            t.copy_(s.detach())
        self._copy_buffers(student_encoder, student_head)

    @torch.no_grad()
    def ema_update(self, student_encoder: nn.Module, student_head: nn.Module, momentum: float) -> None:
        """θ′ ← m·θ′ + (1 − m)·θ (name-matched parameters); buffers copied."""
        pairs = self.pairs(student_encoder, student_head)
        if pairs:
            t = [a for a, _ in pairs]
            s = [b.detach().to(a.dtype) for a, b in pairs]
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1.0 - momentum)
        self._copy_buffers(student_encoder, student_head)

    def _copy_buffers(self, student_encoder: nn.Module, student_head: nn.Module) -> None:
        for mine, theirs in ((self.backbone, student_encoder), (self.head, student_head)):
            src = dict(theirs.named_buffers())
            for name, b in mine.named_buffers():
                if name in src:
                    b.copy_(src[name])


__all__ = ["cosine_momentum", "teacher_patch_temperature", "Centering", "EMATeacher"]
