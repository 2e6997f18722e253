"""What GRASP adds to a training step of the planned network (README "Cost"), from the plans alone.

Per training sample, after the switch epoch:

* the frozen anatomy encoder E_ana: one forward pass under ``torch.no_grad`` *before* the pathology forward -- its
  activations are freed stage by stage and only the fused (deepest) stage outputs are kept, so the peak (during the
  pathology backward) does not see them; its weights sit next to the model, with no gradient and no optimizer state;
* per fused stage s with C_s channels and N_s = prod(spatial_s) tokens: align, SA, SE, LayerNorms and the FFN keep
  O(k · C_s · N_s) activations (k ≈ 12 maps incl. the FFN's 2x width), and the two attentions keep their
  ``heads · N_s²`` attention probabilities for the backward pass (self- and cross-attention: 2 matrices, plus the
  softmax input: x 2) -- an upper bound: ``nn.MultiheadAttention(need_weights=False)`` runs PyTorch's
  scaled-dot-product attention, whose fused kernels do not store the matrices;
* the fusion parameters get gradients and SGD momentum (x 3 floats).

For nnU-Net's 3d_fullres with a 128³ patch the two deepest stages hold 4³ = 64 and 8³ = 512 tokens: the attention
matrices are at most 2 · 2 · 8 · (512² + 64²) · 4 B ≈ 34 MB per sample -- small against a stock step (GBs), so
the declared profile
(``activation_factor`` 1.1, ``static_gb`` 0.3) covers it. The estimate grows with N_s²: for shallow plans (few
stages, large bottlenecks) check :func:`grasp_extra_bytes` or calibrate (``nnx_plan --calibrate``).

Inference: the fusion is dropped, so GRASP's inference cost equals ANA in.'s (ratio 1.00).
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def stage_shapes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list:
    """Spatial shape of every encoder stage's output."""
    shape = [int(p) for p in patch_size]
    out = []
    for s in strides:
        s = [s] * len(shape) if isinstance(s, int) else list(s)
        shape = [a // b for a, b in zip(shape, s)]
        out.append(tuple(shape))
    return out


def grasp_extra_bytes(patch_size: Sequence[int], strides: Sequence[Sequence[int]], features: Sequence[int],
                      batch_size: int, n_fused: int = 2, heads: int = 8, ffn_ratio: float = 2.0,
                      bytes_per_float: int = 4) -> Dict[str, float]:
    """Estimated extra training memory of GRASP (bytes) for one step: attention probabilities (upper bound),
    fusion activations, the largest transient anatomy-encoder stage (freed before the pathology forward, so not at
    the peak) and the (frozen) encoder + fusion parameters."""
    shapes = stage_shapes(patch_size, strides)
    attn = act = 0.0
    fusion_params = 0.0
    for j in range(n_fused):
        c, n = int(features[-1 - j]), float(np.prod(shapes[-1 - j]))
        attn += 2 * 2 * heads * n * n                       # self + cross, probabilities + logits
        act += (12 + 2 * ffn_ratio) * c * n                 # align, SA, SE, norms, q/k/v/out projections, FFN
        fusion_params += c * c * (1 + 2 * 4 + 2 * ffn_ratio) + 2 * c * c / 16
    transient = max(int(f) * float(np.prod(s)) for f, s in zip(features, shapes))
    enc_params = sum(int(features[i]) * int(features[max(i - 1, 0)]) * 27 * 2 for i in range(len(features)))
    return {"attention": attn * batch_size * bytes_per_float,
            "fusion_activations": act * batch_size * bytes_per_float,
            "anatomy_encoder_transient": transient * batch_size * bytes_per_float,
            "anatomy_encoder_weights": enc_params * bytes_per_float,
            "fusion_weights_grads_momentum": 3 * fusion_params * bytes_per_float}


__all__ = ["stage_shapes", "grasp_extra_bytes"]
