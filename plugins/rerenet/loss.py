"""ReReNet's discrepancy-aware loss (Li 2026 thesis, Eq. 3.2-3.6; spec ``shared/specs/000-li-thesis.md`` M1.2).

For stage k (k = 1..K) with current logits ``z^k`` (softmax probabilities ``p^k``), the previous stage's hard mask
``ŷ^{k-1}`` (``ŷ^0`` = the coarse mask) and the expert label ``y``, over the N voxels that are not nnU-Net's ignore
label::

    L_Dice   = 1 - mean_{c in fg} (2 Σ_i p_ic y_ic + s) / (Σ_i p_ic + Σ_i y_ic + s)    (Eq. 3.2)
    w_i      = λ · [ŷ_i^{k-1} != y_i] + 1                                                (Eq. 3.3)
    ℓ_Discr  = (1/N) Σ_i w_i · CE_i,   CE_i = -log p^k_{i, y_i}                          (Eq. 3.4)
    ℓ        = α · L_Dice + (1 - α) · ℓ_Discr      (warm-up epochs: ℓ = L_Dice)          (Eq. 3.5)
    ℓ^k      = ŵ_k · ℓ,   ŵ_k = max(σ, 2^k) / norm                                       (Eq. 3.6)

Defaults λ = 10, α = 0.8, σ = 1, K = 5.

* **Binary = thesis.** With two classes the softmax CE is exactly the thesis' BCE on the foreground probability
  (``p_0 = 1 - p_1``), the XOR of Eq. 3.3 is ``ŷ != y`` and the Dice is the foreground Dice. **Multi-class**: the
  same formulas with ``ŷ != y`` over label values, softmax CE over all classes and the mean Dice over the
  foreground classes (nnU-Net's ``MemoryEfficientSoftDiceLoss``, ``do_bg=False``, smooth ``s = 1e-5``; per sample
  unless the plans set ``batch_dice``).
* **Mean, not sum** (spec M1.2 PROPOSED): ``ℓ_Discr`` is divided by N (not by Σw), so a voxel's weight is exactly
  ``λ + 1`` relative to a non-discrepant voxel and the term stays on the scale of a plain CE.
* **Ignore label**: voxels whose target is nnU-Net's ignore label are left out of both terms (Dice loss mask, CE
  sum and N).
* **Deep supervision**: nnU-Net's scale weights (1, 1/2, 1/4, ..., last 0, normalised to sum 1). The target of a
  lower scale is nnU-Net's nearest-neighbour downsampled label; the discrepancy map ``[ŷ != y]`` is computed at full
  resolution and **max-pooled** to each scale (default: a region containing a discrepant voxel stays discrepant;
  ``ds_pool="nearest"`` takes the map with the same nearest-exact rule as the target instead).
* **Stage weights** (:func:`stage_weights`): ``max(σ, 2^k)`` with k counted from 1 as in Eq. 3.1 (2, 4, 8, 16, 32
  for K = 5; ``index_base=0`` gives 1, 2, 4, 8, 16), divided by their mean by default, so that the K stage weights
  average 1 (a K = 1 run is then exactly an unweighted run). ``norm="sum"`` divides by their sum, ``"none"`` keeps
  the thesis' raw factors (with SGD these multiply the learning rate by up to 32).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

STAGE_NORMS = ("mean", "sum", "none")
DS_POOLS = ("max", "nearest")


def stage_weights(num_stages: int, sigma: float = 1.0, index_base: int = 1, norm: str = "mean") -> List[float]:
    """Eq. 3.6 stage weights ``max(σ, 2^k)`` for k = index_base .. index_base + K - 1, normalised by ``norm``."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if norm not in STAGE_NORMS:
        raise ValueError(f"norm must be one of {STAGE_NORMS}, got {norm!r}")
    raw = [max(float(sigma), 2.0 ** k) for k in range(index_base, index_base + num_stages)]
    div = {"mean": sum(raw) / len(raw), "sum": sum(raw), "none": 1.0}[norm]
    return [r / div for r in raw]


def discrepancy_map(prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[ŷ^{k-1} != y]`` as float ``(B, 1, *spatial)``; ``prev`` is a label map ``(B, *spatial)`` or
    ``(B, 1, *spatial)``, ``target`` ``(B, 1, *spatial)``."""
    if prev.ndim == target.ndim - 1:
        prev = prev[:, None]
    return (prev.long() != target.long()).float()


def discrepancy_weights(prev: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 3.3: ``w = λ · [ŷ^{k-1} != y] + 1``, shape ``(B, 1, *spatial)``."""
    return lam * discrepancy_map(prev, target) + 1.0


def pool_map(d: torch.Tensor, shape: Sequence[int], mode: str = "max") -> torch.Tensor:
    """Bring a full-resolution ``(B, 1, *spatial)`` map to a deep-supervision scale of spatial ``shape``."""
    shape = tuple(int(s) for s in shape)
    if tuple(d.shape[2:]) == shape:
        return d
    if mode == "max":
        fn = F.adaptive_max_pool3d if d.ndim == 5 else F.adaptive_max_pool2d
        return fn(d, shape)
    if mode == "nearest":
        return F.interpolate(d, shape, mode="nearest-exact")
    raise ValueError(f"ds_pool must be one of {DS_POOLS}, got {mode!r}")


class DiscrepancyAwareLoss(nn.Module):
    """Per-stage loss ``ℓ = α·L_Dice + (1-α)·ℓ_Discr`` (Dice only in warm-up); see the module docstring.

    ``forward(output, target, prev, dice_only=False)``: ``output`` logits ``(B, C, *spatial)`` or nnU-Net's deep
    supervision list; ``target`` ``(B, 1, *spatial)`` label map or the matching list; ``prev`` the previous
    stage's hard mask ``(B, *spatial)`` at full resolution. The stage weight is applied by the caller.
    """

    def __init__(self, alpha: float = 0.8, lam: float = 10.0, batch_dice: bool = False,
                 ignore_label: Optional[int] = None, ds_weights: Optional[Sequence[float]] = None,
                 ds_pool: str = "max", smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        if ds_pool not in DS_POOLS:
            raise ValueError(f"ds_pool must be one of {DS_POOLS}, got {ds_pool!r}")
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.ignore_label = ignore_label
        self.ds_weights = None if ds_weights is None else [float(w) for w in ds_weights]
        self.ds_pool = ds_pool
        self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice,
                                                do_bg=False, smooth=smooth, ddp=ddp)

    # -- one scale ---------------------------------------------------------------------------------------------------
    def parts(self, logits: torch.Tensor, target: torch.Tensor, discrepancy: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(L_Dice, ℓ_Discr)`` at one scale; ``discrepancy`` = ``[ŷ != y]`` at this scale ``(B, 1, *spatial)``."""
        if self.ignore_label is not None:
            valid = (target != self.ignore_label)
            tgt = torch.where(valid, target, torch.zeros_like(target))
            mask = valid.float()
        else:
            tgt, mask = target, None
        dice_loss = 1.0 + self.dice(logits, tgt, loss_mask=mask)  # nnU-Net's soft Dice loss is -Dice
        ce = F.cross_entropy(logits.float(), tgt[:, 0].long(), reduction="none")[:, None]  # (B, 1, *spatial)
        w = self.lam * discrepancy + 1.0
        if mask is None:
            discr = (w * ce).mean()
        else:
            discr = (w * ce * mask).sum() / mask.sum().clamp_min(1.0)
        return dice_loss, discr

    def forward(self, output: Union[torch.Tensor, List[torch.Tensor]], target: Union[torch.Tensor, List[torch.Tensor]],
                prev: torch.Tensor, dice_only: bool = False) -> torch.Tensor:
        return self.forward_with_parts(output, target, prev, dice_only)[0]

    def forward_with_parts(self, output, target, prev: torch.Tensor, dice_only: bool = False
                           ) -> Tuple[torch.Tensor, Dict[str, float]]:
        outputs = list(output) if isinstance(output, (list, tuple)) else [output]
        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        if len(outputs) != len(targets):
            raise ValueError(f"{len(outputs)} outputs but {len(targets)} targets")
        if len(outputs) == 1:
            weights = [1.0]
        else:
            weights = self.ds_weights if self.ds_weights is not None else [1.0] + [0.0] * (len(outputs) - 1)
            if len(weights) != len(outputs):
                raise ValueError(f"{len(outputs)} deep-supervision outputs but {len(weights)} weights")
        d_full = discrepancy_map(prev, targets[0])
        total = 0.0
        dice_sum = discr_sum = 0.0
        for o, t, w in zip(outputs, targets, weights):
            if w == 0:
                continue
            d = pool_map(d_full, t.shape[2:], self.ds_pool)
            dice_loss, discr = self.parts(o, t, d)
            loss = dice_loss if dice_only else self.alpha * dice_loss + (1.0 - self.alpha) * discr
            total = total + w * loss
            dice_sum += w * float(dice_loss.detach())
            discr_sum += w * float(discr.detach())
        return total, {"dice_loss": dice_sum, "discr_loss": discr_sum,
                       "discrepant_fraction": float(d_full.mean())}


__all__ = ["DiscrepancyAwareLoss", "stage_weights", "discrepancy_map", "discrepancy_weights", "pool_map",
           "STAGE_NORMS", "DS_POOLS"]
