"""MCSCv2's certainty-guided sampling (spec §5.2; thesis Eq. 5.1-5.6) and its per-class FIFO memory banks.

For a voxel i with (cross) probabilities P_i over C classes:

* entropy ℋ(P_i) = −Σ_c P_i(c) log P_i(c) (5.1); γ_t = the entropy above which the top-β(t) fraction of the
  unlabeled voxels of the mini-batch (both networks pooled) lies: those are *uncertain*, the rest *certain*;
* anchors of class c (5.2, 5.3): labeled voxels with label c and max P_i > h; unlabeled voxels with pseudo-label c,
  max P_i > h and ℋ ≤ γ_t;
* rank O_i(c) = 0-based position of c in P_i sorted descending;
* negative candidates of class c: labeled (5.5) ``y_i ≠ c ∧ O_i(c) < r^l`` (hard negatives predicted as c);
  unlabeled (5.6) ``(ℋ > γ_t ∧ r^h ≤ O_i(c) ≤ C) ∨ (ℋ ≤ γ_t ∧ r^l ≤ O_i(c))``.

``torch.quantile`` refuses more than 16 M elements: γ_t comes from ``kthvalue`` on a random subsample of at most
``max_samples`` entropies (spec §7.3).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch


def entropy(probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """ℋ(P) along ``dim`` (natural log; 0·log 0 = 0)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def entropy_threshold(values: torch.Tensor, beta: float, max_samples: int = 1_000_000,
                      generator: Optional[torch.Generator] = None) -> float:
    """γ such that a fraction ``beta`` of ``values`` is > γ (the uncertain ones); +inf for ``beta <= 0`` or no
    values (everything certain)."""
    v = values.reshape(-1).float()
    if beta <= 0 or v.numel() == 0:
        return float("inf")
    if v.numel() > max_samples:
        idx = torch.randint(0, v.numel(), (int(max_samples),), generator=generator).to(v.device)
        v = v[idx]
    n = v.numel()
    k = int(math.ceil((1.0 - min(float(beta), 1.0)) * n))
    if k <= 0:
        return float("-inf")
    return float(torch.kthvalue(v.cpu(), k).values)


def class_ranks(probs: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C, ...) long: O_i(c), 0 = most probable class."""
    order = torch.argsort(probs, dim=1, descending=True)
    return torch.argsort(order, dim=1)


def anchor_mask(maxprob: torch.Tensor, ent: torch.Tensor, unlabeled: torch.Tensor, h: float,
                gamma: float) -> torch.Tensor:
    """Voxels that may be anchors of their (pseudo-)label: max P > h, and ℋ ≤ γ_t if unlabeled."""
    return (maxprob > h) & (~unlabeled | (ent <= gamma))


def negative_mask(c: int, labels: torch.Tensor, rank_c: torch.Tensor, ent: torch.Tensor, unlabeled: torch.Tensor,
                  gamma: float, r_low: int, r_high: int, num_classes: int) -> torch.Tensor:
    """Negative candidates of class ``c`` (Eq. 5.5 for labeled, 5.6 for unlabeled voxels). ``rank_c`` = O_i(c)."""
    lab = ~unlabeled & (labels != c) & (rank_c < r_low)
    uncertain = ent > gamma
    unl = unlabeled & ((uncertain & (rank_c >= r_high) & (rank_c <= num_classes))
                       | (~uncertain & (rank_c >= r_low)))
    return (lab | unl) & (labels >= 0)


class ClassMemoryBank:
    """One FIFO bank of (feature, class label) per class (the negatives *of* that class), size ``K`` each, features
    stored detached in ``dtype``. ``push`` adds at most ``t_b·K`` entries per call (a random subset if more)."""

    def __init__(self, num_classes: int, size: int, dim: int, push_fraction: float = 0.25,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float16):
        self.num_classes, self.size, self.dim = int(num_classes), int(size), int(dim)
        self.push_fraction = float(push_fraction)
        self.feats = torch.zeros(self.num_classes, self.size, self.dim, dtype=dtype, device=device)
        self.labels = torch.full((self.num_classes, self.size), -1, dtype=torch.long, device=device)
        self.ptr = [0] * self.num_classes
        self.count = [0] * self.num_classes

    @property
    def max_push(self) -> int:
        return max(1, int(self.push_fraction * self.size))

    def __len__(self) -> int:
        return sum(self.count)

    def push(self, c: int, feats: torch.Tensor, labels: torch.Tensor,
             generator: Optional[torch.Generator] = None) -> int:
        """FIFO insert of ``feats`` (n, d) with ``labels`` (n,) into bank c; returns the number pushed."""
        n = feats.shape[0]
        if n == 0:
            return 0
        if n > self.max_push:
            idx = torch.randperm(n, generator=generator)[: self.max_push].to(feats.device)
            feats, labels = feats[idx], labels[idx]
            n = self.max_push
        pos = (torch.arange(n, device=self.feats.device) + self.ptr[c]) % self.size
        self.feats[c, pos] = feats.detach().to(self.feats.dtype)
        self.labels[c, pos] = labels.detach().long().to(self.labels.device)
        self.ptr[c] = (self.ptr[c] + n) % self.size
        self.count[c] = min(self.size, self.count[c] + n)
        return n

    def get(self, c: int) -> Tuple[torch.Tensor, torch.Tensor]:
        n = self.count[c]
        return self.feats[c, :n], self.labels[c, :n]

    def sample(self, c: int, m: int, generator: Optional[torch.Generator] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Up to ``m`` random entries of bank c (without replacement)."""
        f, lab = self.get(c)
        if f.shape[0] > m:
            idx = torch.randperm(f.shape[0], generator=generator)[:m].to(f.device)
            f, lab = f[idx], lab[idx]
        return f, lab

    def state_dict(self) -> Dict[str, object]:
        return {"feats": self.feats.cpu(), "labels": self.labels.cpu(), "ptr": list(self.ptr),
                "count": list(self.count), "push_fraction": self.push_fraction}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if tuple(state["feats"].shape) != tuple(self.feats.shape):
            raise ValueError(f"memory bank shape {tuple(state['feats'].shape)} != {tuple(self.feats.shape)}")
        self.feats.copy_(state["feats"])
        self.labels.copy_(state["labels"])
        self.ptr, self.count = list(state["ptr"]), list(state["count"])
