"""Tests of the CS-Unet plugin (``nnx_plugins.csunet``): spec ``shared/specs/001-liu-thesis.md`` §3.8.

Pure-tensor tests first (window partition, the shifted-window mask against a brute-force definition, shapes and
deep supervision for isotropic / anisotropic plans, no positional parameters, gradients, the thesis' parameter
count, self-describing weights, the memory estimate against measured saved activations), then the trainer on the
tiny phantom (train, nnx_predict, stock nnUNetv2_predict).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from nnx_plugins.csunet import blocks
from nnx_plugins.csunet.network import (CSUNET_OPTIONS, CSUNetPlanning, UNET_SAVED_PER_COUNTED, build_csunet,
                                        csunet_feature_map_size, csunet_memory_profile, csunet_saved_elements,
                                        make_config)
from nnx_plugins.csunet.windows import attention_masks, padded_size, window_partition, window_reverse

# the tiny phantom's CPU plan (3d_fullres): anisotropic first stride (1,2,2), stride-1 z at stage 1
ANISO = {"n_stages": 4, "features_per_stage": [16, 32, 64, 128], "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3],
                                                                                    [3, 3, 3]],
         "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}
ISO = {"n_stages": 5, "features_per_stage": [8, 16, 32, 64, 64], "kernel_sizes": [[3, 3, 3]] * 5,
       "strides": [[1, 1, 1]] + [[2, 2, 2]] * 4}
SMALL = dict(csunet_embed_dim=8, csunet_head_dim=4, csunet_drop_path=0.0, csunet_dropout=0.0)


def _torch_seed(s=0):
    torch.manual_seed(s)
    np.random.seed(s)


# ----------------------------------------------------------------------------------------------- windows and mask
@pytest.mark.parametrize("size,window", [((6, 8), (3, 4)), ((4, 6, 9), (2, 3, 3)), ((1, 6, 4), (1, 3, 2))])
def test_window_partition_roundtrip(size, window):
    x = torch.randn(2, *size, 5)
    w = window_partition(x, window)
    assert w.shape == (2 * int(np.prod([s // k for s, k in zip(size, window)])), *window, 5)
    assert torch.equal(window_reverse(w, window, size, 2), x)
    # first window of sample 1 holds the tokens of the corner block of sample 1
    n_w = w.shape[0] // 2
    corner = x[(1,) + tuple(slice(0, k) for k in window)]
    assert torch.equal(w[n_w], corner)


def _brute_allowed(size, window, shift):
    """Brute force: in the rolled, padded grid, i may attend to j (same window) iff j is a real token and their
    original positions differ exactly like their rolled positions on every axis (no wrap across the seam); i == j
    always. Returns (allowed (nW, N, N), real (nW, N))."""
    padded = padded_size(size, window)
    n_win = [p // w for p, w in zip(padded, window)]
    out, reals = [], []
    for widx in itertools.product(*[range(n) for n in n_win]):
        pos = [tuple(wi * w + o for wi, w, o in zip(widx, window, off))
               for off in itertools.product(*[range(w) for w in window])]
        orig = [tuple((p + s) % P for p, s, P in zip(q, shift, padded)) for q in pos]
        real = [all(o < s for o, s in zip(q, size)) for q in orig]
        n = len(pos)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            for j in range(n):
                same = all(pi - pj == oi - oj for pi, pj, oi, oj in zip(pos[i], pos[j], orig[i], orig[j]))
                m[i, j] = (same and real[j]) or i == j
        out.append(m)
        reals.append(torch.tensor(real))
    return torch.stack(out), torch.stack(reals)


@pytest.mark.parametrize("size,window,shift", [((7, 7), (4, 4), (2, 2)), ((5, 6, 4), (3, 3, 2), (1, 1, 1)),
                                               ((4, 9, 9), (2, 3, 3), (0, 1, 1)), ((5, 5), (3, 3), (0, 0))])
def test_shifted_window_mask_matches_brute_force(size, window, shift):
    allowed, valid = attention_masks(size, window, shift, torch.device("cpu"))
    ref, real = _brute_allowed(size, window, shift)
    assert allowed is not None and torch.equal(allowed, ref) and torch.equal(valid, real)
    if any(shift):  # a shifted grid has pairs of real tokens that share a window but not a region
        assert bool((~ref & real[:, None, :] & real[:, :, None]).any())


def test_no_mask_for_plain_windows():
    assert attention_masks((6, 6, 6), (3, 3, 3), (0, 0, 0), torch.device("cpu")) == (None, None)


def _reference_attention(attn: blocks.ConvWindowAttention, win, size, window, shift):
    """softmax over the brute-force-allowed keys, one query at a time; padded outputs zeroed; then the output
    projection, as the module's docstring states."""
    q, k, v = attn.qkv(win)
    ref_allowed, real = _brute_allowed(size, window, shift)
    n_w = ref_allowed.shape[0]
    out = torch.zeros_like(q)
    for bw in range(q.shape[0]):
        m = ref_allowed[bw % n_w]
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                if not real[bw % n_w, i]:
                    continue  # padded query: output zero
                keys = m[i].nonzero()[:, 0]
                s = (q[bw, h, i] @ k[bw, h, keys].T) / math.sqrt(q.shape[-1])
                out[bw, h, i] = torch.softmax(s, 0) @ v[bw, h, keys]
    c, n = win.shape[-1], q.shape[2]
    out = out.transpose(1, 2).reshape(q.shape[0], n, c).transpose(1, 2).reshape(q.shape[0], c, *window)
    return blocks.to_channels_last(torch.nn.functional.gelu(attn.proj(out)))


@pytest.mark.parametrize("explicit", [False, True])
def test_sw_attention_equals_brute_force_and_never_crosses_the_seam(explicit):
    _torch_seed(0)
    size, window, shift, dim = (5, 6, 4), (3, 3, 2), (1, 1, 1), 8
    blk = blocks.CSTBlock(3, dim, 2, window, shift, (3, 3, 3), 4.0, 0.5, 0.0).eval()
    blk.attn.explicit = explicit
    blk.attn.keep_attention = True
    x = torch.randn(2, *size, dim)  # batch 2: the mask must follow the window order of each sample
    y = blk.norm1(x)
    padded = padded_size(size, window)
    y = torch.nn.functional.pad(y, [0, 0] + sum([[0, p - s] for s, p in zip(reversed(size), reversed(padded))], []))
    y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    win = window_partition(y, window)
    allowed, valid = attention_masks(size, window, shift, x.device)
    with torch.no_grad():
        got = blk.attn(win, allowed, valid, 2)
        ref = _reference_attention(blk.attn, win, size, window, shift)
    assert torch.allclose(got, ref, atol=1e-5)
    if explicit:  # attention probabilities across the seam or onto padding are exactly zero
        p = blk.attn.last_attention  # (B*nW, heads, N, N)
        forbidden = ~_brute_allowed(size, window, shift)[0].repeat(2, 1, 1)[:, None].expand_as(p)
        assert bool(forbidden.any()) and float(p.masked_select(forbidden).abs().max()) == 0.0


def test_padded_windows_equal_cropped_windows():
    """A grid that is not a multiple of the window: padding + masking gives, at every real token, exactly what
    attention inside the cropped (partial) window gives, convolutions zero-padded at the crop."""
    _torch_seed(1)
    size, window, dim = (5, 7), (3, 4), 8
    attn = blocks.ConvWindowAttention(2, dim, 2, window).eval()
    x = torch.randn(1, *size, dim)
    padded = padded_size(size, window)
    xp = torch.nn.functional.pad(x, [0, 0, 0, padded[1] - size[1], 0, padded[0] - size[0]])
    allowed, valid = attention_masks(size, window, (0, 0), x.device)
    with torch.no_grad():
        got = window_reverse(attn(window_partition(xp, window), allowed, valid, 1), window, padded, 1)
        got = got[:, :size[0], :size[1]]
        ref = torch.zeros_like(x)
        for i0 in range(0, size[0], window[0]):
            for j0 in range(0, size[1], window[1]):
                w = x[:, i0:i0 + window[0], j0:j0 + window[1]]
                a, b = w.shape[1:3]
                xc = blocks.to_channels_first(w)
                q, k, v = [norm(conv(xc).flatten(2).transpose(1, 2)).reshape(1, a * b, 2, dim // 2).transpose(1, 2)
                           for conv, norm in ((attn.q, attn.norm_q), (attn.k, attn.norm_k), (attn.v, attn.norm_v))]
                o = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // 2), -1) @ v
                o = o.transpose(1, 2).reshape(1, a * b, dim).transpose(1, 2).reshape(1, dim, a, b)
                ref[:, i0:i0 + a, j0:j0 + b] = blocks.to_channels_last(torch.nn.functional.gelu(attn.proj(o)))
    assert torch.allclose(got, ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- the network
def _ds_shapes(arch, patch):
    """nnU-Net's deep-supervision scales of a plan: stages 0..S-2."""
    sizes, cur = [], list(patch)
    for s in arch["strides"][:-1]:
        cur = [c // k for c, k in zip(cur, s)]
        sizes.append(tuple(cur))
    return sizes


@pytest.mark.parametrize("arch,patch,opts", [
    (ANISO, (12, 40, 40), dict(csunet_window=3)),      # z grid 6 at stage 2: window 3, 2 windows; xy grid 10: pad
    (ANISO, (8, 24, 24), dict(csunet_window=7)),       # window clamped to the grid (4, 6, 6) / (2, 3, 3)
    (ISO, (32, 32, 48), dict(csunet_window=3, csunet_depths="1-2-1")),
])
def test_shapes_and_deep_supervision(arch, patch, opts):
    _torch_seed(0)
    net = build_csunet(arch, 2, 4, True, patch, **SMALL, **opts)
    x = torch.randn(2, 2, *patch)
    out = net(x)
    assert isinstance(out, list) and [tuple(o.shape[2:]) for o in out] == _ds_shapes(arch, patch)
    assert all(o.shape[:2] == (2, 4) for o in out)
    net.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
    single = net(x)
    assert torch.is_tensor(single) and single.shape == (2, 4, *patch)
    net.eval()
    with torch.no_grad():
        a = net(x)
        net.decoder.deep_supervision = True
        assert torch.allclose(net(x)[0], a)  # same full-resolution output, with or without deep supervision


def test_layout_follows_the_plan():
    net = build_csunet(ANISO, 1, 3, False, (12, 40, 40), **SMALL, csunet_window=3)
    lay = net.layout
    assert lay["grids"][2] == [6, 10, 10] and lay["grids"][3] == [3, 5, 5]
    assert lay["windows"][2] == [3, 3, 3] and lay["shifts"][2] == [1, 1, 1]
    assert lay["windows"][3] == [3, 3, 3] and lay["shifts"][3] == [0, 1, 1]  # z covered by one window: no shift
    assert lay["dims"] == [2, 4, 8, 16] and lay["heads"] == {2: 2, 3: 4}
    assert tuple(net.embed.conv2.stride) == (1, 2, 2) and tuple(net.embed.conv4.stride) == (2, 2, 2)
    assert tuple(net.embed.conv1.kernel_size) == (1, 3, 3)  # the plan's thin kernel at stage 0
    wide = build_csunet(ANISO, 1, 3, False, (28, 56, 56), csunet_embed_dim=0)
    assert wide.layout["dims"] == ANISO["features_per_stage"]
    deep = make_config({"n_stages": 8, "features_per_stage": [32] * 8, "kernel_sizes": [[3, 3]] * 8,
                        "strides": [[1, 1]] + [[2, 2]] * 7}, 1, 2, (512, 512))
    from nnx_plugins.csunet.network import layout
    assert layout(deep)["dims"][2:] == [96, 192, 384, 768, 768, 768]  # capped at csunet_max_dim
    assert wide.layout["dsf_kernels"] == {2: [7, 7, 7], 3: [7, 7, 7]}
    thin = build_csunet({**ANISO, "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]]}, 1, 3, False,
                        (4, 56, 56), **SMALL)
    assert thin.layout["dsf_kernels"][2] == [5, 7, 7] and thin.layout["dsf_kernels"][3] == [3, 7, 7]
    assert thin.layout["windows"][3] == [2, 7, 7]
    fit = build_csunet(ANISO, 1, 3, False, (12, 40, 40), **SMALL, csunet_window=5, csunet_window_fit="divide")
    assert fit.layout["windows"][2] == [3, 5, 5] and fit.layout["shifts"][2] == [1, 2, 2]  # divisors, no padding
    assert fit(torch.randn(1, 1, 12, 40, 40)).shape == (1, 3, 12, 40, 40)


def test_no_positional_parameters():
    """No positional embedding or relative-position bias: every parameter belongs to a convolution, a linear
    layer, a LayerNorm or the DSF LayerScale."""
    net = build_csunet(ISO, 1, 3, True, (32, 32, 32), **SMALL)
    allowed = (nn.Conv3d, nn.ConvTranspose3d, nn.Linear, nn.LayerNorm)
    owners = {}
    for mname, mod in net.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            owners[f"{mname}.{pname}"] = mod
    for name, mod in owners.items():
        assert isinstance(mod, allowed) or (isinstance(mod, blocks.DSF) and name.endswith("gamma")), name
        assert "pos" not in name and "bias_table" not in name and "absolute" not in name, name
    assert not [n for n, _ in net.named_buffers() if n != "csunet_config"]


def test_gradients_reach_every_parameter():
    _torch_seed(0)
    net = build_csunet(ANISO, 1, 3, True, (12, 40, 40), **SMALL, csunet_window=3)
    out = net(torch.randn(2, 1, 12, 40, 40))
    sum(o.float().pow(2).mean() for o in out).backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0.0]
    assert not dead


def test_thesis_2d_configuration_has_the_reported_parameter_count():
    """Spec §3.8.1: 2D, embed 96, depths 2,2,2,2, heads 3,6,12,24, window 7, 224x224, 9 classes: 24.68 M (Table
    3.3). Our heads differ (1x1 deep-supervision heads, two expansions to stages 1 and 0), hence a tolerance."""
    arch = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 512, 512], "kernel_sizes": [[3, 3]] * 6,
            "strides": [[1, 1]] + [[2, 2]] * 5}
    net = build_csunet(arch, 3, 9, False, (224, 224))
    assert net.layout["heads"] == {2: 3, 3: 6, 4: 12, 5: 24}
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 24.68e6 - 1) < 0.02, n


def test_weights_carry_their_architecture():
    """Stock prediction rebuilds the network without trainer options: loading the weights rebuilds it."""
    _torch_seed(0)
    trained = build_csunet(ANISO, 1, 3, True, (12, 40, 40), **SMALL, csunet_window=3, csunet_depths="1-3")
    fresh = build_csunet(ANISO, 1, 3, False, (12, 40, 40))  # defaults (what a predictor without options builds)
    assert fresh.config != trained.config
    fresh.load_state_dict(trained.state_dict())
    assert fresh.config == trained.config and not fresh.decoder.deep_supervision
    trained.eval()
    fresh.eval()
    trained.decoder.deep_supervision = False
    x = torch.randn(1, 1, 12, 40, 40)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    held = build_csunet(ANISO, 1, 3, False, (12, 40, 40))
    held.rebuild_on_load = False  # an optimizer holds it: a mismatch is an error, not a silent rebuild
    with pytest.raises(RuntimeError, match="other settings"):
        held.load_state_dict(trained.state_dict())


def test_bad_options_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown CS-Unet option"):
        build_csunet(ANISO, 1, 3, False, (12, 40, 40), csunet_windw=3)
    with pytest.raises(ValueError, match="csunet_depths"):
        build_csunet(ANISO, 1, 3, False, (12, 40, 40), csunet_depths="2-a")
    with pytest.raises(ValueError, match="odd"):
        build_csunet(ANISO, 1, 3, False, (12, 40, 40), csunet_dsf_kernel=4)
    with pytest.raises(ValueError, match="at least 3 stages"):
        two = {"n_stages": 2, "strides": ANISO["strides"][:2], "kernel_sizes": ANISO["kernel_sizes"][:2],
               "features_per_stage": [8, 16]}
        build_csunet(two, 1, 3, False, (12, 40, 40))
    assert set(CSUNET_OPTIONS) >= {"csunet_window", "csunet_depths", "csunet_embed_dim", "csunet_head_dim"}


# ----------------------------------------------------------------------------------------------- memory estimate
def _saved_elements(net, x):
    """Elements of the tensors autograd saves for backward (distinct storages, parameters excluded)."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x)
    params = {(p.untyped_storage().data_ptr(), p.dtype) for p in net.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


def test_memory_estimate_matches_saved_activations_and_grows_with_the_patch():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    _torch_seed(0)
    unet_kw = dict(ANISO, conv_op="torch.nn.modules.conv.Conv3d", n_conv_per_stage=[2] * 4,
                   n_conv_per_stage_decoder=[2] * 3, conv_bias=True,
                   norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                   dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU",
                   nonlin_kwargs={"inplace": True})
    patch = (12, 40, 40)
    unet = get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", unet_kw,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 3, deep_supervision=True)
    x = torch.randn(1, 1, *patch)
    ratio = _saved_elements(unet, x) / unet.compute_conv_feature_map_size(patch)
    assert abs(ratio / UNET_SAVED_PER_COUNTED - 1) < 0.05  # the unit conversion into nnU-Net's estimate
    for opts in (dict(csunet_window=3), dict(csunet_window=7, csunet_embed_dim=0)):
        net = build_csunet(ANISO, 1, 3, True, patch, **opts, csunet_drop_path=0.0, csunet_dropout=0.0)
        measured = _saved_elements(net, x)
        assert abs(csunet_saved_elements(net.config, patch) / measured - 1) < 0.15
        assert net.compute_conv_feature_map_size(patch) == csunet_feature_map_size(net.config, patch)
    # the planning stand-in (what nnx planning instantiates from the plan) gives the same number
    plan = CSUNetPlanning(input_channels=1, num_classes=3, csunet={"csunet_window": 3}, **unet_kw)
    assert plan.compute_conv_feature_map_size(patch) == pytest.approx(
        csunet_feature_map_size(make_config(ANISO, 1, 3, patch, csunet_window=3), patch))
    sizes = [(12, 40, 40), (16, 48, 48), (24, 64, 64), (28, 96, 96)]
    est = [plan.compute_conv_feature_map_size(s) for s in sizes]
    assert all(b > a for a, b in zip(est, est[1:]))
    prof = csunet_memory_profile(csunet_window=3)
    assert prof["activation_factor"] == 0.0 and prof["extra_architectures"][0]["arch_kwargs"]["csunet"][
        "csunet_window"] == 3



def test_cost_table_counts_the_networks_it_compares():
    """cost.compare on a plan (meta device): parameters equal the built networks'; MACs of the CS-Unet include
    the attention matmuls (more than with SDPA, which the counter does not see)."""
    from nnx_plugins.csunet.cost import _macs, compare
    arch = dict(ANISO, conv_op="torch.nn.modules.conv.Conv3d", n_conv_per_stage=[2] * 4,
                n_conv_per_stage_decoder=[2] * 3, conv_bias=True,
                norm_op="torch.nn.modules.instancenorm.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
    plans = {"configurations": {"3d_fullres": {"patch_size": [12, 40, 40], "batch_size": 2, "architecture": {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet", "arch_kwargs": arch,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    res = compare(plans, "3d_fullres", 1, 3, {"csunet_window": 3})
    net = build_csunet(ANISO, 1, 3, True, (12, 40, 40), csunet_window=3)
    assert res["csunet"]["params_M"] == pytest.approx(sum(p.numel() for p in net.parameters()) / 1e6)
    assert res["csunet"]["estimate"] == pytest.approx(net.compute_conv_feature_map_size((12, 40, 40)))
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net.eval()(torch.randn(1, 1, 12, 40, 40))  # SDPA path: attention not counted
    assert res["csunet"]["GMACs"] * 1e9 > fc.get_total_flops() / 2
    assert _macs(net, torch.randn(1, 1, 12, 40, 40)) == pytest.approx(res["csunet"]["GMACs"] * 1e9)
    assert res["unet"]["params_M"] > 0 and res["unet"]["GMACs"] > 0

def test_overfits_one_synthetic_volume():
    """Spec §3.8.5: ~30 AdamW steps on one synthetic volume (a sphere in noise) drive Dice+CE down."""
    import torch.nn.functional as F
    _torch_seed(0)
    patch = (8, 32, 32)
    zz, yy, xx = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in patch], indexing="ij")
    y = (((zz - 4) / 3) ** 2 + ((yy - 15) / 12) ** 2 + ((xx - 16) / 12) ** 2 < 1).long()[None]
    x = (y.float() + 0.3 * torch.randn(patch))[None]
    net = build_csunet(ANISO, 1, 2, False, patch, **{**SMALL, "csunet_embed_dim": 16}, csunet_window=4)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = net(x)
        p = logits.softmax(1)[:, 1]
        dice = 1 - (2 * (p * y).sum() + 1e-5) / (p.sum() + y.sum() + 1e-5)
        loss = F.cross_entropy(logits, y) + dice
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[10:20]) < np.mean(losses[:10]) and np.mean(losses[20:]) < np.mean(losses[10:20])
    assert losses[-1] < 0.5 * losses[0] and float(dice) < 0.45  # it segments the sphere, not just background


# ----------------------------------------------------------------------------------------------------- the trainer
def test_warmup_poly_schedule():
    from nnx_plugins.csunet.trainer import WarmupPolyLR
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupPolyLR(opt, 1e-3, 20, 10)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(9) == pytest.approx(1e-3)   # linear warm-up, 10 epochs
    assert s.lr_at(10) == pytest.approx(1e-3)
    assert s.lr_at(15) == pytest.approx(1e-3 * 0.5 ** 0.9)                               # poly over the rest
    assert s.lr_at(19) == pytest.approx(1e-3 * 0.1 ** 0.9)
    s.step(15)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 0.9)
    short = WarmupPolyLR(opt, 1e-3, 1, 10)  # a 1-epoch run: no warm-up left, full lr
    assert short.lr_at(0) == pytest.approx(1e-3)
    from nnx_plugins.csunet.trainer import warmup_epochs  # auto: the thesis' 10 epochs, at most 10/300 of the run
    assert [warmup_epochs(-1, e) for e in (1000, 300, 100, 20, 1)] == [10, 10, 3, 1, 1]
    assert warmup_epochs(5, 20) == 5


def test_trainer_options_are_checked_with_one_line_errors():
    from nnx.errors import NNXError
    from nnx.options import resolve
    from nnx_plugins.csunet.trainer import CSUNetTrainer
    vals = resolve(CSUNetTrainer, {"csunet_window": "4", "optimizer": "sgd"})
    assert vals["csunet_window"] == 4 and vals["initial_lr"] == 1e-3 and vals["weight_decay"] == 5e-4
    for bad, msg in (({"csunet_depths": "2-a"}, "csunet_depths"), ({"csunet_window": "0"}, "csunet_window"),
                     ({"optimizer": "adam"}, "optimizer"), ({"warmup_epochs": "-2"}, "warmup_epochs")):
        with pytest.raises(NNXError, match=msg) as e:
            resolve(CSUNetTrainer, bad)
        assert "\n" not in str(e.value)
    assert CSUNetTrainer.nnx_inference_network_is_stock is False
    assert CSUNetTrainer.nnx_memory["extra_architectures"][0]["network_class_name"].endswith("CSUNetPlanning")


TRAIN_OPTS = ["csunet_embed_dim=16", "csunet_window=4", "csunet_depths=1-2", "warmup_epochs=0"]


@pytest.mark.slow
def test_train_nnx_predict_and_stock_predict_agree(tiny_planned, nnunet_env, tmp_path, monkeypatch):
    """nnx_train (1 epoch of 2 iterations, nnU-Net validation) -> the checkpoint predicts through nnx_predict, and
    stock nnUNetv2_predict (nnUNet_extTrainer), which builds the network without the trainer options, reloads the
    trained architecture from the weights and gives the same segmentation."""
    import os
    import shutil
    import sys

    import SimpleITK as sitk

    from conftest import TINY_ID, nnx_cmd, run_cli
    r = run_cli(nnx_cmd("train", str(TINY_ID), "3d_fullres", "0", "-tr", "CSUNetTrainer", "-device", "cpu",
                        "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1", "--opt", *TRAIN_OPTS),
                env={"nnUNet_n_proc_DA": "0", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], tiny_planned, "CSUNetTrainer__nnUNetPlans__3d_fullres")
    ck = torch.load(os.path.join(out, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    from nnx_plugins.csunet.network import _decode
    cfg = _decode(ck["network_weights"]["csunet_config"])
    assert cfg["csunet_embed_dim"] == 16 and cfg["csunet_window"] == 4 and cfg["csunet_depths"] == "1-2"
    assert cfg["patch_size"] == [28, 56, 56] and cfg["n_stages"] == 4
    assert os.path.isfile(os.path.join(out, "fold_0", "validation", "summary.json"))
    assert isinstance(ck["optimizer_state"]["param_groups"][0].get("betas"), tuple)  # AdamW

    images = os.path.join(nnunet_env["nnUNet_raw"], tiny_planned, "imagesTs")
    first = sorted(os.listdir(images))[0].rsplit("_", 1)[0]
    raw = tmp_path / "in"  # one test case (all its channels): prediction cost is per case
    raw.mkdir()
    for f in os.listdir(images):
        if f.rsplit("_", 1)[0] == first:
            shutil.copy(os.path.join(images, f), raw / f)
    raw = str(raw)
    from nnx.cli.predict import main as nnx_predict
    assert nnx_predict(["-i", raw, "-o", str(tmp_path / "nnx"), "-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0",
                        "-tr", "CSUNetTrainer", "-device", "cpu", "--disable_tta", "--quiet"]) == 0
    from nnx.ext_path import SHIM_DIR
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    monkeypatch.delenv("NNX_TRAINER_OPTS", raising=False)
    monkeypatch.setattr(sys, "argv", ["nnUNetv2_predict", "-i", raw, "-o", str(tmp_path / "stock"), "-d",
                                      str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", "CSUNetTrainer", "-device",
                                      "cpu", "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar"])
    predict_entry_point()
    cases = sorted(f for f in os.listdir(tmp_path / "nnx") if f.endswith(".nii.gz"))
    stock_cases = sorted(f for f in os.listdir(tmp_path / "stock") if f.endswith(".nii.gz"))
    assert cases == [first + ".nii.gz"] == stock_cases
    for f in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nnx" / f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "stock" / f)))
        assert np.array_equal(a, b), f
