"""Losses of the cross-teaching family (spec §4.2, §5.2; thesis Eq. 4.1, 4.2, 5.7).

* :func:`cps_dice_loss`: cross pseudo-supervision, Dice only, against the other network's detached hard
  prediction (Eq. 4.1). The Dice is SSL4MIS' ``DiceLoss`` used by CTS / MCSC: per class (background included)
  ``1 − (2 Σ p·y + ε) / (Σ p² + Σ y² + ε)`` over the whole batch, ε = 1e-5, averaged over the classes.
* :func:`balanced_supcon_loss`: the class-balanced supervised contrastive loss of MCSC (Eq. 4.2) on the pixel /
  voxel features ``A`` of one group::

      L = −(1/|A|) Σ_i 1/(|A_{y_i}|−1) Σ_{p ∈ A_{y_i}∖{i}} log( exp(a_i·a_p/τ) / Σ_{j ∈ Y_A} (1/|A_j'|) Σ_{k ∈ A_j∖{i}} exp(a_i·a_k/τ) )

  with ``|A_j'| = |A_j| − 1`` for the anchor's own class and ``|A_j|`` otherwise (the anchor is excluded from its
  own denominator, as in the MCSC code); an anchor with no positive (alone in its class) contributes 0 but counts
  in ``|A|`` (code behaviour).
* :func:`certainty_contrast_loss`: MCSCv2's loss (Eq. 5.7) of sampled anchors against their class-mean positive
  and class-balanced negatives from a memory bank::

      L = −(1/|C|) Σ_c (1/|an_c|) Σ_{a_i ∈ an_c} log( exp(a_i·a_p/τ) / (exp(a_i·a_p/τ) + Z) ),
      Z = Σ_{j ∈ Y_N} (1/|n_c^j|) Σ_{a_k ∈ n_c^j} exp(a_i·a_k/τ)
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F


def cps_dice_loss(logits: torch.Tensor, pseudo: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Soft Dice of ``softmax(logits)`` (B, C, ...) against the hard labels ``pseudo`` (B, ...) (long), batch-level,
    background included, averaged over the C classes (SSL4MIS ``DiceLoss``). ``pseudo`` must be detached."""
    c = logits.shape[1]
    p = torch.softmax(logits.float(), 1)
    y = F.one_hot(pseudo.long(), c).movedim(-1, 1).to(p.dtype)
    axes = [0] + list(range(2, p.ndim))
    inter = (p * y).sum(axes)
    den = (p * p).sum(axes) + (y * y).sum(axes)
    return (1.0 - (2.0 * inter + smooth) / (den + smooth)).mean()


def balanced_supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Eq. 4.2 on one group: ``features`` (n, d) L2-normalised, ``labels`` (n,) (long)."""
    n = features.shape[0]
    f = features.float()
    logits = f @ f.t() / temperature                               # s_ik / τ
    y = labels.view(-1)
    same = y.view(-1, 1) == y.view(1, -1)
    eye = torch.eye(n, dtype=torch.bool, device=f.device)
    counts = torch.bincount(y, minlength=int(y.max()) + 1).to(f.dtype)
    # weight of key k in anchor i's denominator: 1/(|A_{y_k}| − [y_k = y_i]); the anchor itself is excluded
    per_key = counts[y].view(1, -1).expand(n, n) - same.to(f.dtype)
    log_w = torch.where(eye, torch.full_like(per_key, float("inf")), per_key.clamp_min(1.0).log())
    log_den = torch.logsumexp(logits - log_w, dim=1)                # log Σ_k exp(s_ik/τ) / w_ik
    pos = same & ~eye
    n_pos = pos.sum(1)
    log_prob = logits - log_den.view(-1, 1)
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos.clamp_min(1)
    return -(mean_pos * (n_pos > 0)).sum() / n


def certainty_contrast_loss(anchors: Dict[int, torch.Tensor], positives: Dict[int, torch.Tensor],
                            negatives: Dict[int, torch.Tensor], negative_labels: Dict[int, torch.Tensor],
                            temperature: float = 0.1) -> Optional[torch.Tensor]:
    """Eq. 5.7 for one scale. Per class c: ``anchors[c]`` (n_c, d), ``positives[c]`` (d,), ``negatives[c]``
    (m_c, d) with ``negative_labels[c]`` (m_c,). Classes without anchors or without negatives are skipped (|C| =
    classes with both); None if no class qualifies."""
    terms: List[torch.Tensor] = []
    for c, a in anchors.items():
        neg = negatives.get(c)
        if a is None or a.shape[0] == 0 or neg is None or neg.shape[0] == 0:
            continue
        a = a.float()
        s_pos = (a @ positives[c].float().view(-1, 1)).squeeze(1) / temperature      # (n,)
        s_neg = a @ neg.float().t() / temperature                                   # (n, m)
        lab = negative_labels[c].long()
        cnt = torch.bincount(lab)
        log_w = cnt[lab].to(a.dtype).log().view(1, -1)                                # 1/|n_c^j| per key
        log_z = torch.logsumexp(s_neg - log_w, dim=1)
        log_prob = s_pos - torch.logaddexp(s_pos, log_z)
        terms.append(-log_prob.mean())
    if not terms:
        return None
    return torch.stack(terms).mean()
