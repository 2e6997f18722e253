"""MOD's losses (paper Eq. 1–9; spec 002 §2.3–§2.5). Views are stacked as (V, B, ...) with V = 2: index 0 = μ,
1 = ν; the student saw the masked μ̂, ν̂, the teacher the unmasked μ, ν.

Probabilities (iBOT): student  P_s = softmax(g_s / τ_s);  teacher  P_t = softmax((g_t − c) / τ_t), no gradient.
Cross-entropy of one pair: H(P_t, P_s) = −Σ_k P_t,k · log P_s,k.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor, center: torch.Tensor,
                       teacher_temp: float, student_temp: float) -> torch.Tensor:
    """H(P_t, P_s) = −Σ_k softmax((g_t − c)/τ_t)_k · log_softmax(g_s/τ_s)_k over the last axis (no reduction).
    The teacher side is detached."""
    p_t = F.softmax((teacher_logits.detach().float() - center.float()) / teacher_temp, dim=-1)
    log_p_s = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(p_t * log_p_s).sum(-1)


def efm_loss(teacher_patch: torch.Tensor, student_patch: torch.Tensor, token_mask: torch.Tensor,
             center: torch.Tensor, teacher_temp: float, student_temp: float) -> torch.Tensor:
    """Masked patch-token self-distillation, same view (Eq. 1, iBOT's L_MIM):

        L_efm = mean_v mean_b [ Σ_t m_{v,b,t} · H(P_t(f_θ′(v)_b,t), P_s(f_θ(v̂)_b,t)) / max(Σ_t m_{v,b,t}, 1) ]

    ``teacher_patch``/``student_patch`` (V, B, T, K), ``token_mask`` (V, B, T) bool (True = masked). Unmasked
    tokens contribute nothing (and get no gradient)."""
    ce = soft_cross_entropy(teacher_patch, student_patch, center, teacher_temp, student_temp)  # (V, B, T)
    m = token_mask.float()
    per_image = (ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return per_image.mean()


def cls_loss(teacher_cls: torch.Tensor, student_cls: torch.Tensor, center: torch.Tensor, teacher_temp: float,
             student_temp: float) -> torch.Tensor:
    """Global-token self-distillation across views (Eq. 2, iBOT's L_[CLS]):

        L_cls = mean over pairs (q ≠ v) of mean_b H(P_t(f^cls_θ′(q)_b), P_s(f^cls_θ(v̂)_b))
              = ½ [ H(t(ν), s(μ̂)) + H(t(μ), s(ν̂)) ]   for V = 2

    ``teacher_cls``/``student_cls`` (V, B, K). The same-view pairs are not used."""
    v = teacher_cls.shape[0]
    terms = [soft_cross_entropy(teacher_cls[q], student_cls[s], center, teacher_temp, student_temp).mean()
             for q in range(v) for s in range(v) if q != s]
    return torch.stack(terms).mean()


def ot_loss(l_efm: torch.Tensor, l_cls: torch.Tensor, alpha: float = 1.5, beta: float = 0.5) -> torch.Tensor:
    """L_OT = α·L_efm + β·L_cls (Eq. 3; α = 1.5, β = 0.5)."""
    return alpha * l_efm + beta * l_cls


def dp_loss(recon: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """Masked L1 reconstruction (Eq. 4, masked patches only; target = the unmasked augmented view):

        L_DP = mean_v [ Σ_{b,c,x} M_{v,b,x} · |v_{b,c,x} − recon(v̂)_{b,c,x}| / (C · Σ_{b,x} M_{v,b,x}) ]

    ``recon``/``target`` (V, B, C, *spatial), ``voxel_mask`` (V, B, 1, *spatial) with 1 = masked."""
    c = recon.shape[2]
    v = recon.shape[0]
    err = (recon.float() - target.float()).abs() * voxel_mask.float()
    num = err.reshape(v, -1).sum(-1)
    den = voxel_mask.float().reshape(v, -1).sum(-1).clamp_min(1.0) * c
    return (num / den).mean()


def mod_loss(l_ot: torch.Tensor, l_dp: torch.Tensor, lambda_ot: float = 1.0, lambda_dp: float = 1.0):
    """L_MOD = λ₁·L_OT + λ₂·L_DP (Eq. 5; λ₁ = λ₂ = 1). The total is L_MOD + L_SEG (Eq. 9)."""
    return lambda_ot * l_ot + lambda_dp * l_dp


def entropy(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """Mean entropy of softmax((g − c)/τ) (collapse monitor: → 0 one-hot collapse, → log K uniform collapse)."""
    p = F.softmax((logits.float() - center.float()) / temp, dim=-1)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()


# ----------------------------------------------------------------------------------------------- segmentation
class FocalLoss(nn.Module):
    """Focal loss with γ = 2 (Eq. 7 as typeset is garbled; spec §2.5: standard focal loss, α none), mean over
    the voxels that are not ignored.

    sigmoid (regions, one-hot target):  −[y·(1 − p)^γ·log p + (1 − y)·p^γ·log(1 − p)]
    softmax (labels, index target):     −(1 − p_y)^γ · log p_y"""

    def __init__(self, sigmoid: bool, gamma: float = 2.0, ignore_label: Optional[int] = None):
        super().__init__()
        self.sigmoid, self.gamma, self.ignore_label = bool(sigmoid), float(gamma), ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None):
        logits = logits.float()
        if self.sigmoid:
            y = target.float()
            logp = F.logsigmoid(logits)
            log1mp = F.logsigmoid(-logits)
            p = logp.exp()
            loss = -(y * (1 - p) ** self.gamma * logp + (1 - y) * p ** self.gamma * log1mp)
        else:
            t = target[:, 0].long()
            if self.ignore_label is not None:
                mask = (t != self.ignore_label).unsqueeze(1)
                t = torch.where(mask[:, 0], t, torch.zeros_like(t))
            logp = F.log_softmax(logits, 1).gather(1, t.unsqueeze(1))
            loss = -((1 - logp.exp()) ** self.gamma) * logp
        if mask is None:
            return loss.mean()
        m = mask.float().expand_as(loss)
        return (loss * m).sum() / m.sum().clamp_min(1e-8)


class DC_and_Focal_loss(nn.Module):
    """L_SEG = λ₁·L_focal + λ₂·L_dice (Eq. 8; λ₁ = λ₂ = 1): nnU-Net's soft Dice (same settings as its DC_and_CE /
    DC_and_BCE losses) plus :class:`FocalLoss`; ignore labels handled as nnU-Net does."""

    def __init__(self, regions: bool, soft_dice_kwargs: dict, ignore_label: Optional[int] = None,
                 gamma: float = 2.0, weight_focal: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1
        self.regions, self.ignore_label = bool(regions), ignore_label
        self.use_ignore = ignore_label is not None
        self.weight_focal, self.weight_dice = float(weight_focal), float(weight_dice)
        self.focal = FocalLoss(sigmoid=regions, gamma=gamma, ignore_label=None if regions else ignore_label)
        self.dc = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                              **soft_dice_kwargs)

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.regions:
            if self.use_ignore:  # ignore channel is the last one of the one-hot target (nnU-Net convention)
                ign = target[:, -1:]
                mask = ~ign if ign.dtype == torch.bool else (1 - ign).bool()
                target = target[:, :-1]
            else:
                mask = None
            dc = self.dc(net_output, target, loss_mask=mask)
            fl = self.focal(net_output, target, mask)
        else:
            if self.use_ignore:
                mask = target != self.ignore_label
                dc = self.dc(net_output, torch.where(mask, target, 0), loss_mask=mask)
                fl = self.focal(net_output, target) if mask.any() else net_output.sum() * 0
            else:
                dc = self.dc(net_output, target)
                fl = self.focal(net_output, target)
        return self.weight_focal * fl + self.weight_dice * dc


__all__ = ["soft_cross_entropy", "efm_loss", "cls_loss", "ot_loss", "dp_loss", "mod_loss", "entropy", "FocalLoss",
           "DC_and_Focal_loss"]
