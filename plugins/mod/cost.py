"""The step-time ratio MOD / stock implied by the extra forward and backward work (README "Cost").

Per training sample, with the multiply-accumulates (MACs) of one forward pass of

    E_k  encoder stem + stages 0..k (k = token stage)      E_r  encoder stages k+1..
    D    decoder incl. the deep-supervision outputs         P    dense predictor
    H_t  projection head on the cls + all T patch tokens (teacher: all tokens feed the centre)
    H_s  projection head on the cls + the round(r·T) masked tokens (student: L_efm needs no others)
    V    number of views (2)

and a backward pass costing ``b`` forwards (b ≈ 2: gradients w.r.t. inputs and weights):

    stock step  (1 + b)·(E_k + E_r + D)
    MOD step    (1 + b)·((1 + V)·E_k + E_r + D)       student: clean batch + V masked views to the token stage,
                                                      deeper stages and decoder on the clean batch only
              + (1 + b)·V·(H_s + P)                   student head and dense predictor on the views
              + V·(E_k + H_t)                         EMA teacher on the unmasked views, forward only

    ratio = MOD / stock.  With H, P ≈ 0 and e = E_k / (E_k + E_r + D): ratio = 1 + e·(V·(1 + b) + V) / (1 + b)
          = 1 + 8e/3 for V = 2, b = 2 (e ≈ 0.33 for nnU-Net's PlainConvUNet, whose decoder costs about twice its
          encoder, gives ≈ 1.9).

Elementwise work (views, masking, EMA update, norms and activations) is not counted; it is small next to the
convolutions on a GPU and a few per cent on a CPU.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .backbone import encoder_of, run_to_stage, unwrap

_COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def count_macs(fn, modules: Sequence[nn.Module]) -> int:
    """MACs of the conv / transposed conv / linear layers inside ``modules`` while ``fn()`` runs."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            total[0] += int(out.numel()) * m.in_features
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            x = inp[0]
            total[0] += int(x.numel()) * (m.out_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())
        else:
            total[0] += int(out.numel()) * (m.in_channels // m.groups) * int(torch.tensor(m.kernel_size).prod())

    handles = []
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, _COUNTED):
                handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def step_costs(network: nn.Module, patch_size: Sequence[int], in_channels: int, token_stage: int,
               head: Optional[nn.Module] = None, dense_predictor: Optional[nn.Module] = None,
               mask_ratio: float = 0.6) -> Dict[str, int]:
    """MACs per sample of E_k, E_r, D, H_t, H_s, P (see module docstring), counted on meta-device copies (no
    compute)."""
    from .masking import num_masked
    net = copy.deepcopy(unwrap(network)).to("meta")
    enc = encoder_of(net)
    x = torch.zeros(1, in_channels, *patch_size, device="meta")
    feats = {}

    def first():
        feats["tok"] = run_to_stage(enc, x, token_stage)

    e_k = count_macs(first, [enc])
    skips = [None]

    def full():
        skips[0] = enc(x)

    e_all = count_macs(full, [enc])
    s = skips[0]
    d = count_macs(lambda: net.decoder(s if isinstance(s, list) else [s]), [net.decoder])
    tok = feats["tok"]
    h_t = h_s = p = 0
    if head is not None:
        hm = copy.deepcopy(head).to("meta")
        c = tok.shape[1]
        t = int(torch.tensor(tok.shape[2:]).prod())
        h_t = count_macs(lambda: hm(torch.zeros(1, c, device="meta"), torch.zeros(t, c, device="meta")), [hm])
        n = num_masked(t, mask_ratio)
        h_s = count_macs(lambda: hm(torch.zeros(1, c, device="meta"), torch.zeros(n, c, device="meta")), [hm])
    if dense_predictor is not None:
        pm = copy.deepcopy(dense_predictor).to("meta")
        p = count_macs(lambda: pm(tok), [pm])
    return {"E_k": e_k, "E_r": e_all - e_k, "D": d, "H_t": h_t, "H_s": h_s, "P": p}


def expected_step_ratio(costs: Dict[str, int], views: int = 2, backward_factor: float = 2.0,
                        teacher: bool = True) -> float:
    """MOD step / stock step from :func:`step_costs` (formula in the module docstring). ``teacher`` False for the
    ablation without the online tokenizer (no teacher forward; H_t, H_s are 0 then)."""
    b = backward_factor
    e_k, e_r, d, h_t, h_s, p = (costs[k] for k in ("E_k", "E_r", "D", "H_t", "H_s", "P"))
    stock = (1 + b) * (e_k + e_r + d)
    mod = (1 + b) * ((1 + views) * e_k + e_r + d) + (1 + b) * views * (h_s + p)
    if teacher:
        mod += views * (e_k + h_t)
    return float(mod / stock)


__all__ = ["count_macs", "step_costs", "expected_step_ratio"]
