"""3DRotNPC per-slice weighted cross-entropy (Li 2026 thesis, Eq. 4.2-4.3) and the balanced proxy accuracy."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .rotation import NUM_ROTATION_CLASSES


def batch_inverse_frequency_weights(labels: torch.Tensor, num_classes: int = NUM_ROTATION_CLASSES) -> torch.Tensor:
    """``w_y = 1 / p_y`` with ``p_y`` the proportion of class ``y`` among all slices of the mini-batch; classes
    absent from the batch get weight 0. Returns a float32 tensor of shape ``(num_classes,)``."""
    y = labels.reshape(-1).long()
    counts = torch.bincount(y, minlength=num_classes)[:num_classes].float()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    return torch.where(counts > 0, 1.0 / p.clamp_min(1e-12), torch.zeros_like(p))


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_ROTATION_CLASSES) -> torch.Tensor:
    r"""Per-slice cross-entropy with batch inverse-frequency class weights.

    ``logits``: ``(B, D, K)`` (any shape ``(..., K)``), ``labels``: ``(B, D)`` with values in ``{0..K-1}``.

    Thesis (Eq. 4.2-4.3): :math:`w_y = 1/p^{(b)}_y`, :math:`p^{(b)}_y` = proportion of class :math:`y` among the
    :math:`N = B \cdot D` slices of the current mini-batch (classes absent from the batch: :math:`w_y = 0`), and the
    slice loss :math:`-w_{y_i} \log \mathrm{softmax}(z_i)_{y_i}`. Implemented as
    ``F.cross_entropy(logits.reshape(-1, K), labels.reshape(-1), weight=w)``, i.e. PyTorch's weighted mean

    .. math:: L = \frac{\sum_i w_{y_i}\,(-\log \mathrm{softmax}(z_i)_{y_i})}{\sum_i w_{y_i}}
             = \frac{1}{|\mathcal{Y}_b|} \sum_{y \in \mathcal{Y}_b} \frac{1}{n_y} \sum_{i: y_i = y} \mathrm{CE}_i ,

    the mean over the classes present in the batch (:math:`\mathcal{Y}_b`) of the per-class mean CE
    (:math:`\sum_i w_{y_i} = N |\mathcal{Y}_b|`). The literal Eq. 4.3 (``(1/N) \sum_i w_{y_i} CE_i``) is
    :math:`|\mathcal{Y}_b|` times this value; the normalised form keeps the loss scale independent of how many
    rotation classes a small batch happens to contain. A batch whose labels are all 0 gives the plain mean CE.
    Softmax (not sigmoid) is used, as the thesis speaks of a probability distribution over the four angles.
    """
    k = logits.shape[-1]
    if k != num_classes:
        raise ValueError(f"logits must end with {num_classes} classes, got shape {tuple(logits.shape)}")
    z = logits.reshape(-1, k).float()
    y = labels.reshape(-1).long().to(z.device)
    if z.shape[0] != y.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    w = batch_inverse_frequency_weights(y, num_classes).to(z.device)
    return F.cross_entropy(z, y, weight=w)


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor,
                     num_classes: int = NUM_ROTATION_CLASSES) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class (argmax of ``logits``)."""
    pred = logits.reshape(-1, logits.shape[-1]).argmax(-1).detach().cpu()
    true = labels.reshape(-1).long().detach().cpu()
    idx = true * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean per-class recall over the classes that occur (row sum > 0); NaN if no class occurs."""
    confusion = np.asarray(confusion, dtype=np.float64)
    support = confusion.sum(1)
    present = support > 0
    if not present.any():
        return float("nan")
    return float(np.mean(np.diag(confusion)[present] / support[present]))


__all__ = ["batch_inverse_frequency_weights", "rotation_loss", "confusion_matrix", "balanced_accuracy"]
