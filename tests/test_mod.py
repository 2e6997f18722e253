"""Tests of the MOD plugin (``nnx_plugins.mod``): masking, views, heads, losses against hand-computed values,
schedules, the spec's smoke tests (spec 002 §8) on a real trainer, and one short training run through nnx_train
followed by nnx_export + stock prediction."""
from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY_ID, nnx_cmd, run_cli
from nnx_plugins.mod.backbone import (TeacherBackbone, choose_token_stage, cumulative_strides, run_to_stage,
                                      split_forward, token_grid)
from nnx_plugins.mod.cost import expected_step_ratio, step_costs
from nnx_plugins.mod.heads import (DensePredictor, MODStudentModules, NormedLinear, ProjectionHead, head_logits,
                                   pixel_shuffle_nd, tokens_and_cls)
from nnx_plugins.mod.loss import (DC_and_Focal_loss, FocalLoss, cls_loss, dp_loss, efm_loss, mod_loss, ot_loss,
                                  soft_cross_entropy)
from nnx_plugins.mod.masking import (apply_mask, block_token_mask, masked_token_index, num_masked,
                                     random_token_mask, token_masks, upsample_mask)
from nnx_plugins.mod.teacher import Centering, EMATeacher, cosine_momentum, teacher_patch_temperature
from nnx_plugins.mod.views import adjust_contrast, gaussian_blur, make_views

SMALL_HEAD = "out_dim=64 head_hidden=32 head_bottleneck=16"


def _unet(features=(8, 16, 32, 32), strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)), in_ch=2, n_cls=3,
          deep_supervision=True):
    """The spec's tiny PlainConvUNet (§8): 4 stages, features 8/16/32/32, InstanceNorm, deep supervision."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    n = len(features)
    return PlainConvUNet(in_ch, n, features, torch.nn.Conv3d, [(3, 3, 3)] * n, strides, 2, n_cls, 2, True,
                         torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=deep_supervision)


# --------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("mode", ["block", "random"])
def test_masks_have_exact_count(mode):
    rng = np.random.default_rng(0)
    for grid in ((4, 4, 4), (7, 7, 7), (2, 8, 8), (1, 3, 5), (6, 6)):
        t = int(np.prod(grid))
        m = token_masks(5, grid, 0.6, rng, mode)
        assert m.shape == (5, *grid) and m.dtype == torch.bool
        assert torch.equal(m.reshape(5, -1).sum(1), torch.full((5,), num_masked(t, 0.6)))
    assert [num_masked(t, 0.6) for t in (64, 343, 128, 15, 36)] == [38, 206, 77, 9, 22]
    assert num_masked(5, 0.5) == 3 and num_masked(10, 0.999) == 10


def test_block_masking_is_blockwise_and_seeded():
    a = block_token_mask((8, 8, 8), 0.6, np.random.default_rng(1))
    b = block_token_mask((8, 8, 8), 0.6, np.random.default_rng(1))
    assert np.array_equal(a, b)

    def same_neighbours(m):  # fraction of axis-neighbour pairs with equal mask value
        return np.mean([np.mean(np.diff(m.astype(int), axis=ax) == 0) for ax in range(3)])

    r = random_token_mask((8, 8, 8), 0.6, np.random.default_rng(1))
    assert same_neighbours(a) > same_neighbours(r) + 0.15      # blocks are spatially coherent


def test_upsampled_mask_and_mask_token():
    tm = torch.tensor([[[[True, False], [False, True]]]])      # (1, 1, 2, 2) token grid
    vm = upsample_mask(tm, (2, 3, 2))
    assert vm.shape == (1, 1, 2, 6, 4)
    for z, y, x in np.ndindex(1, 2, 2):                        # constant within each stride block
        blk = vm[0, 0, z * 2:(z + 1) * 2, y * 3:(y + 1) * 3, x * 2:(x + 1) * 2]
        assert torch.all(blk == float(tm[0, z, y, x]))
    x = torch.randn(1, 2, 2, 6, 4)
    tok = torch.nn.Parameter(torch.tensor([1.5, -2.0]).view(1, 2, 1, 1, 1))
    xh = apply_mask(x, vm, tok)
    m = vm.bool().expand_as(x)
    assert torch.equal(xh[~m], x[~m])                          # unmasked voxels = the view
    assert torch.all(xh[:, 0][m[:, 0]] == 1.5) and torch.all(xh[:, 1][m[:, 1]] == -2.0)
    xh.sum().backward()
    assert torch.allclose(tok.grad.flatten(), vm.sum().repeat(2))   # the mask token is learnable


# ------------------------------------------------------------------------------------------------------ views
def test_views_keep_geometry_and_differ():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 12, 10)
    mu, nu = make_views(x)
    assert mu.shape == x.shape == nu.shape and not torch.equal(mu, x) and not torch.equal(nu, x)
    assert torch.allclose(gaussian_blur(torch.full((1, 1, 6, 6, 6), 3.0), 1.0), torch.full((1, 1, 6, 6, 6), 3.0))
    imp = torch.zeros(1, 1, 9, 9, 9)
    imp[0, 0, 4, 4, 4] = 1
    bl = gaussian_blur(imp, 1.0)
    assert math.isclose(float(bl.sum()), 1.0, rel_tol=1e-5) and int(bl.argmax()) == int(imp.argmax())  # centred
    assert torch.allclose(bl, bl.flip(2)) and torch.allclose(bl, bl.flip(4))
    f = torch.tensor([[0.5, 1.5]])
    c = adjust_contrast(x[:1], f)                               # range kept (clipped); f < 1 keeps the mean
    assert torch.allclose(c[0, 0].mean(), x[0, 0].mean(), atol=1e-5)
    assert c.amax() <= x[:1].amax() and c.amin() >= x[:1].amin()
    assert torch.allclose(c[0, 0], (x[0, 0] - x[0, 0].mean()) * 0.5 + x[0, 0].mean(), atol=1e-6)


# ------------------------------------------------------------------------------------------- backbone, heads
def test_token_stage_split_forward_and_teacher_backbone():
    net = _unet()
    enc = net.encoder
    assert cumulative_strides(enc, 3) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 8)]
    assert choose_token_stage(enc, 3, 16) == 3 and choose_token_stage(enc, 3, 4) == 2
    assert choose_token_stage(enc, 3, 16, stage=1) == 1
    aniso = _unet(strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)))
    assert choose_token_stage(aniso.encoder, 3, 8) == 3        # (4, 8, 8) is closer to 8 than (2, 4, 4)
    assert token_grid((32, 32, 32), (8, 8, 8)) == (4, 4, 4)
    with pytest.raises(ValueError):
        token_grid((30, 32, 32), (8, 8, 8))
    x, v = torch.randn(2, 2, 32, 32, 32), torch.randn(4, 2, 32, 32, 32)
    skips, tok = split_forward(enc, x, v, 2)
    ref = enc(x)
    assert len(skips) == len(ref) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(skips, ref))
    assert torch.allclose(tok, run_to_stage(enc, v, 2), atol=1e-5) and tok.shape == (4, 32, 8, 8, 8)
    tb = TeacherBackbone(enc, 2)
    assert len(tb.stages) == 3 and set(dict(tb.named_parameters())) <= set(dict(enc.named_parameters()))
    assert torch.allclose(tb(v), tok, atol=1e-5)
    # per-view passes (view_passes=per_view): same outputs and same gradients as the batched pass (InstanceNorm)
    grads = []
    for chunk in (None, 2):
        enc.zero_grad()
        sk, tk = split_forward(enc, x, v, 2, chunk)
        assert torch.allclose(tk, tok, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(sk, ref))
        (sk[-1].square().mean() + tk.square().mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_heads_and_dense_predictor():
    nl = NormedLinear(8, 5)
    assert torch.allclose(nl.weight().norm(dim=1), torch.ones(5)) and nl.weight_g is None
    h = ProjectionHead(12, out_dim=20, hidden_dim=16, bottleneck_dim=6)
    feat = torch.randn(2, 12, 2, 3, 4)
    patch, cls = tokens_and_cls(feat)
    assert patch.shape == (48, 12) and torch.allclose(cls, feat.mean((2, 3, 4)))
    assert torch.equal(patch[5], feat[0, :, 0, 1, 1])          # grid order (row-major), same as the token masks
    lc, lp = head_logits(h, feat)
    assert lc.shape == (2, 20) and lp.shape == (2, 24, 20)
    tm = token_masks(2, (2, 3, 4), 0.5, np.random.default_rng(0))
    idx = masked_token_index(tm)
    assert idx.shape == (2, 12) and all(torch.equal(tm[i].flatten().nonzero()[:, 0], idx[i]) for i in range(2))
    lc2, lp2 = head_logits(h, feat, idx)                        # the student's head on its masked tokens only
    assert torch.allclose(lc2, lc) and lp2.shape == (2, 12, 20)
    assert torch.allclose(lp2, torch.stack([lp[i, idx[i]] for i in range(2)]), atol=1e-6)
    assert h.last_layer2 is None and ProjectionHead(12, 20, 16, 6, shared_head=False).last_layer2 is not None
    # pixel shuffle: same channel convention as torch's 2D pixel_shuffle
    y = torch.randn(2, 3 * 4, 5, 6)
    assert torch.equal(pixel_shuffle_nd(y, 3, (2, 2)), torch.nn.functional.pixel_shuffle(y, 2))
    dp = DensePredictor(12, 2, (2, 4, 4))
    assert dp(feat).shape == (2, 2, 4, 12, 16)
    # token (z, y, x) predicts exactly the voxels of its own block
    with torch.no_grad():
        dp.proj.weight.zero_()
        dp.proj.bias.zero_()
    probe = torch.zeros_like(feat)
    probe[1, :, 1, 2, 3] = 1.0
    with torch.no_grad():
        dp.proj.weight[:, 0] = 1.0
    rec = dp(probe)
    nz = torch.nonzero(rec[1, 0])
    assert rec[0].abs().sum() == 0 and nz[:, 0].unique().tolist() == [2, 3]
    assert nz[:, 1].unique().tolist() == [8, 9, 10, 11] and nz[:, 2].unique().tolist() == [12, 13, 14, 15]


# ------------------------------------------------------------------------------------ losses (hand-computed)
def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_soft_cross_entropy_by_hand():
    t = torch.tensor([[1.0, 0.0, -1.0]])
    s = torch.tensor([[0.5, 0.2, 0.1]])
    c = torch.tensor([[0.1, 0.0, 0.2]])
    p_t = _np_softmax((np.array([[1.0, 0.0, -1.0]]) - np.array([[0.1, 0.0, 0.2]])) / 0.04)
    log_p_s = np.log(_np_softmax(np.array([[0.5, 0.2, 0.1]]) / 0.1))
    expected = -(p_t * log_p_s).sum()
    assert math.isclose(float(soft_cross_entropy(t, s, c, 0.04, 0.1)), expected, rel_tol=1e-5)


def test_efm_loss_by_hand_and_only_on_masked_tokens():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 2, 4, 5, generator=g)
    s = torch.randn(2, 2, 4, 5, generator=g, requires_grad=True)
    mask = torch.tensor([[[1, 0, 1, 0], [0, 0, 0, 1]], [[1, 1, 1, 1], [0, 0, 0, 0]]], dtype=torch.bool)
    c = torch.zeros(1, 5)
    loss = efm_loss(t, s, mask, c, 0.07, 0.1)
    h = (-(_np_softmax(t.numpy() / 0.07) * np.log(_np_softmax(s.detach().numpy() / 0.1))).sum(-1))  # (V, B, T)
    m = mask.numpy()
    per_image = (h * m).sum(-1) / np.maximum(m.sum(-1), 1)     # empty mask -> 0, still counted in the mean
    assert math.isclose(float(loss.detach()), per_image.mean(), rel_tol=1e-5)
    loss.backward()
    assert torch.all(s.grad[~mask] == 0) and torch.all(s.grad[mask].abs().sum(-1) > 0)
    # teacher logits of unmasked tokens do not matter
    t2 = t.clone()
    t2[~mask] = 100.0
    assert torch.equal(efm_loss(t2, s.detach(), mask, c, 0.07, 0.1), loss.detach())


def test_view_pairing():
    """L_cls pairs teacher(q) with student(v̂) for q != v only; L_efm pairs the same view only."""
    g = torch.Generator().manual_seed(1)
    tc, sc = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    c = torch.randn(1, 6, generator=g)
    expected = 0.5 * (soft_cross_entropy(tc[1], sc[0], c, 0.04, 0.1).mean()
                      + soft_cross_entropy(tc[0], sc[1], c, 0.04, 0.1).mean())
    assert torch.allclose(cls_loss(tc, sc, c, 0.04, 0.1), expected)

    def grad_wrt_student(loss_fn, t, s, view):
        s = s.clone().requires_grad_(True)
        loss_fn(t, s).backward()
        return s.grad[view]

    cls_fn = lambda t, s: cls_loss(t, s, c, 0.04, 0.1)  # noqa: E731
    t_mod = tc.clone()
    t_mod[0] = torch.randn(3, 6, generator=g)                    # change the teacher's μ
    assert torch.equal(grad_wrt_student(cls_fn, tc, sc, 0), grad_wrt_student(cls_fn, t_mod, sc, 0))   # μ̂ pairs ν
    assert not torch.allclose(grad_wrt_student(cls_fn, tc, sc, 1), grad_wrt_student(cls_fn, t_mod, sc, 1))

    tp, sp = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    efm_fn = lambda t, s: efm_loss(t, s, mask, c, 0.07, 0.1)  # noqa: E731
    tp_mod = tp.clone()
    tp_mod[1] = torch.randn(3, 4, 6, generator=g)                # change the teacher's ν
    assert torch.equal(grad_wrt_student(efm_fn, tp, sp, 0), grad_wrt_student(efm_fn, tp_mod, sp, 0))  # μ̂ pairs μ
    assert not torch.allclose(grad_wrt_student(efm_fn, tp, sp, 1), grad_wrt_student(efm_fn, tp_mod, sp, 1))


def test_dp_loss_by_hand_and_only_on_masked_voxels():
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 5.0, 1.0]).view(2, 1, 2, 2, 1, 1).requires_grad_(True)
    tgt = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]).view(2, 1, 2, 2, 1, 1)
    vm = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 1, 1, 2, 1, 1)   # view μ: voxel 0, view ν: voxel 1
    # μ: channels (1,2)/(3,4) vs targets (0,0)/(1,1), masked voxel 0: |1-0| + |3-1| = 3 over C·1 = 2 -> 1.5
    # ν: channels (0,0)/(5,1) vs (1,1)/(1,1), masked voxel 1: |0-1| + |1-1| = 1 over 2 -> 0.5
    loss = dp_loss(rec, tgt, vm)
    assert math.isclose(float(loss.detach()), (1.5 + 0.5) / 2, rel_tol=1e-6)
    loss.backward()
    assert torch.all(rec.grad[vm.expand_as(rec) == 0] == 0)


def test_loss_combination():
    e, c, d = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(1.0)
    assert float(ot_loss(e, c)) == 1.5 * 2 + 0.5 * 4
    assert float(mod_loss(ot_loss(e, c), d)) == 5.0 + 1.0


def test_focal_and_dice_focal_by_hand():
    z = torch.tensor([[[[[2.0, -1.0]]]]])                          # (1, 1, 1, 1, 2) region logits
    y = torch.tensor([[[[[1.0, 0.0]]]]])
    p = torch.sigmoid(z)
    # y = 1: -(1-p)^2 log p ; y = 0: -p^2 log(1-p)
    exp = (-(1 - p[..., 0]) ** 2 * torch.log(p[..., 0]) - p[..., 1] ** 2 * torch.log(1 - p[..., 1])).sum() / 2
    assert torch.allclose(FocalLoss(sigmoid=True)(z, y), exp)
    zl = torch.tensor([[[[[1.0]]], [[[3.0]]]]])                     # (1, 2 classes, 1, 1, 1)
    tl = torch.tensor([[[[[0]]]]])
    p0 = torch.softmax(zl, 1)[0, 0]
    assert torch.allclose(FocalLoss(sigmoid=False)(zl, tl), (-(1 - p0) ** 2 * torch.log(p0)).reshape(()))
    assert torch.allclose(FocalLoss(sigmoid=False, gamma=0)(zl, tl),
                          torch.nn.functional.cross_entropy(zl, tl[:, 0].long()))
    # ignore label: ignored voxels do not count
    zl2 = torch.randn(1, 3, 2, 2, 2)
    tl2 = torch.randint(0, 3, (1, 1, 2, 2, 2))
    tl2[..., 0] = 3
    full = DC_and_Focal_loss(False, {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
                             ignore_label=3)(zl2, tl2)
    assert torch.isfinite(full)
    fl = FocalLoss(sigmoid=False, ignore_label=3)(zl2, tl2)
    ref = FocalLoss(sigmoid=False)(zl2[..., 1:], tl2[..., 1:])
    assert torch.allclose(fl, ref)


# -------------------------------------------------------------------------------------------------- schedules
def test_momentum_schedule():
    k = 1000
    ms = np.array([cosine_momentum(i, k) for i in range(k)])
    assert ms[0] == 0.996 and abs(ms[-1] - 1.0) < 1e-7 and np.all(np.diff(ms) >= 0)
    assert math.isclose(cosine_momentum(500, 1000), 0.998, rel_tol=1e-12)
    assert cosine_momentum(k, k) == 1.0 and cosine_momentum(5 * k, k) == 1.0
    # iBOT's cosine_scheduler(0.996, 1, epochs, niter_per_ep)
    ibot = 1 + 0.5 * (0.996 - 1) * (1 + np.cos(np.pi * np.arange(k) / k))
    assert np.allclose(ms, ibot, atol=1e-15)


def test_teacher_patch_temperature_schedule():
    ibot = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))
    assert np.allclose([teacher_patch_temperature(e) for e in range(100)], ibot)
    assert teacher_patch_temperature(0, warmup_epochs=0) == 0.07


def test_warmup_cosine_lr():
    from nnx_plugins.mod.trainer import WarmupCosineLR
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosineLR(opt, 1e-3, 10, warmup_steps=2)
    lrs = [s.lr_at(e) for e in range(10)]
    assert np.allclose(lrs[:3], [5e-4, 1e-3, 1e-3]) and np.all(np.diff(lrs[1:]) <= 0) and lrs[-1] > 0
    assert math.isclose(lrs[6], 1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    s.step(6)
    assert opt.param_groups[0]["lr"] == lrs[6]


def test_centering_and_ema_teacher():
    c = Centering(4)
    c.cls.fill_(1.0)
    tc, tp = torch.randn(3, 4), torch.randn(3, 5, 4)
    c.update(tc, tp, 0.9)
    assert torch.allclose(c.cls, 0.9 + 0.1 * tc.mean(0, keepdim=True))
    assert torch.allclose(c.patch, 0.1 * tp.mean((0, 1)).unsqueeze(0))
    net = _unet()
    head = ProjectionHead(32, 16, 8, 4)
    t = EMATeacher(net.encoder, 2, head)
    assert all(not p.requires_grad for p in t.parameters())
    pairs = t.pairs(net.encoder, head)
    assert len(pairs) == len(list(t.parameters()))              # every teacher parameter has a student twin
    old = [a.clone() for a, _ in pairs]
    with torch.no_grad():
        for p in list(net.encoder.parameters()) + list(head.parameters()):
            p.add_(torch.randn_like(p))
    t.ema_update(net.encoder, head, 0.99)
    for (a, b), o in zip(pairs, old):
        assert torch.allclose(a, 0.99 * o + 0.01 * b)
    t.train()
    assert not t.training


def test_expected_step_ratio():
    costs = {"E_k": 4, "E_r": 1, "D": 5, "H_t": 0, "H_s": 0, "P": 0}
    # stock 3 * 10 = 30; MOD 3 * (3*4 + 1 + 5) + 2 * 4 = 62
    assert math.isclose(expected_step_ratio(costs), 62 / 30)
    assert math.isclose(expected_step_ratio(costs, teacher=False), 54 / 30)
    net = _unet()
    real = step_costs(net, (32, 32, 32), 2, 3, ProjectionHead(32, 64, 32, 16), DensePredictor(32, 2, (8, 8, 8)))
    assert real["E_r"] == 0 and real["E_k"] > 0 and real["D"] > real["E_k"] and real["H_t"] > real["H_s"] > 0
    assert math.isclose(expected_step_ratio(dict(costs, H_t=2, H_s=1, P=1)), (62 + 3 * 2 * 2 + 2 * 2) / 30)
    assert 1.5 < expected_step_ratio(real) < 3.0


def test_attachment_mod_losses_reach_encoder_not_decoder():
    from nnx_plugins.mod.trainer import MODTrainWrapper
    torch.manual_seed(0)
    net = _unet()
    head = ProjectionHead(32, 16, 8, 4)
    student = MODStudentModules(2, 3, head, DensePredictor(32, 2, (8, 8, 8)))
    w = MODTrainWrapper(net, student, 3)
    x, v = torch.randn(1, 2, 32, 32, 32), torch.randn(2, 2, 32, 32, 32)
    tm = token_masks(2, (4, 4, 4), 0.6, np.random.default_rng(0))
    vm = upsample_mask(tm, (8, 8, 8))
    out = w(x, v, vm, masked_token_index(tm))
    assert [o.shape[1:] for o in out["seg"]][0] == (3, 32, 32, 32)
    assert out["s_patch"].shape == (2, 38, 16) and out["recon"].shape == v.shape
    (out["s_cls"].sum() + out["s_patch"].sum() + out["recon"].sum()).backward()   # MOD only, no seg loss
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.decoder.parameters() if not any(p is q for q in net.encoder.parameters()))
    assert student.mask_token.grad.abs().sum() > 0


def test_2d_network():
    """2D configurations: token masks, views, dense predictor and the wrapper work on Conv2d U-Nets too."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnx_plugins.mod.trainer import MODTrainWrapper
    net = PlainConvUNet(1, 3, (8, 16, 16), torch.nn.Conv2d, 3, (1, 2, 2), 2, 2, 2, True, torch.nn.InstanceNorm2d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                        deep_supervision=True)
    k = choose_token_stage(net.encoder, 2, 16)
    stride = cumulative_strides(net.encoder, 2)[k]
    student = MODStudentModules(1, 2, ProjectionHead(16, 8, 8, 4), DensePredictor(16, 1, stride))
    x = torch.randn(2, 1, 16, 24)
    mu, nu = make_views(x)
    v = torch.cat([mu, nu])
    tm = token_masks(4, token_grid((16, 24), stride), 0.6, np.random.default_rng(0))
    vm = upsample_mask(tm, stride)
    out = MODTrainWrapper(net, student, k)(x, v, vm, masked_token_index(tm))
    assert out["recon"].shape == v.shape and out["s_patch"].shape == (4, 14, 8)
    assert float(dp_loss(out["recon"].detach().reshape(2, 2, 1, 16, 24), v.reshape(2, 2, 1, 16, 24),
                         vm.reshape(2, 2, 1, 16, 24))) > 0


# ---------------------------------------------------------------------------------------- trainer smoke tests
def _make_trainer(name, opts, monkeypatch, pp, fold=0):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx.registry import load_trainer
    monkeypatch.setenv("NNX_TRAINER_OPTS", opts)
    plans = load_json(os.path.join(pp, "nnUNetPlans.json"))
    plans["continue_training"] = False
    return load_trainer(name)(plans, "3d_fullres", fold, load_json(os.path.join(pp, "dataset.json")),
                              torch.device("cpu"))


def _batch(tr, seed=0):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    patch = tr.configuration_manager.patch_size
    x = torch.randn(tr.batch_size, tr.num_input_channels, *patch, generator=g)
    t = torch.randint(0, tr.label_manager.num_segmentation_heads, (tr.batch_size, 1, *patch), generator=g).short()
    targets = [t if all(i == 1 for i in s) else F.interpolate(t.float(), scale_factor=s, mode="nearest").short()
               for s in tr._get_deep_supervision_scales()]
    return {"data": x, "target": targets}


@pytest.fixture(scope="module")
def pp_folder(tiny_planned, nnunet_env):
    return os.path.join(nnunet_env["nnUNet_preprocessed"], tiny_planned)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def stepped(pp_folder, one_thread):
    """A MODTrainer (small head) after initialize() and two train_steps on a fixed batch, with spies on the inputs
    of the student wrapper and the teacher, and snapshots around the second step."""
    mp = pytest.MonkeyPatch()
    try:
        tr = _make_trainer("MODTrainer", SMALL_HEAD, mp, pp_folder)
        tr.initialize()
        tr.mod_teacher.copy_from(tr._mod_student_encoder(), tr.mod_student.head)
        init_teacher = copy.deepcopy(tr.mod_teacher.state_dict())
        init_student = {k: v.clone() for k, v in tr.network.encoder.state_dict().items()}
        seen = {}
        wrapper_fwd, teacher_fwd = tr._mod_train_module.forward, tr.mod_teacher.forward

        def spy_wrapper(x, views=None, voxel_mask=None, token_index=None):
            seen["views"], seen["vmask"], seen["tidx"] = views.clone(), voxel_mask.clone(), token_index.clone()
            return wrapper_fwd(x, views, voxel_mask, token_index)

        def spy_teacher(v, chunk=None):
            seen["teacher_in"] = v.clone()
            seen["teacher_out"] = teacher_fwd(v, chunk)
            return seen["teacher_out"]

        tr._mod_train_module.forward = spy_wrapper
        tr.mod_teacher.forward = spy_teacher
        batch = _batch(tr)
        outs = [tr.train_step(batch)]
        before = {"teacher": copy.deepcopy(tr.mod_teacher.state_dict()),
                  "centers": copy.deepcopy(tr.mod_centers.state_dict()), "it": tr.mod_it}
        outs.append(tr.train_step(batch))
        yield {"tr": tr, "outs": outs, "seen": seen, "before": before, "init_teacher": init_teacher,
               "init_student": init_student, "batch": batch}
    finally:
        mp.undo()


def test_inference_network_has_no_mod_parameters(stepped):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    tr = stepped["tr"]
    stock = nnUNetTrainer.build_network_architecture(tr.plans_manager, tr.configuration_manager,
                                                     tr.num_input_channels, tr.label_manager.num_segmentation_heads,
                                                     True)
    assert type(tr.network) is type(stock) and set(tr.network.state_dict()) == set(stock.state_dict())
    net_ids = {id(p) for p in tr.network.parameters()}
    assert not net_ids & {id(p) for p in tr.mod_student.parameters()}
    assert not net_ids & {id(p) for p in tr.mod_teacher.parameters()}
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in tr.mod_student.parameters() if p.requires_grad} <= opt_ids and net_ids <= opt_ids
    assert not opt_ids & {id(p) for p in tr.mod_teacher.parameters()}
    assert tr.nnx_inference_network_is_stock and tr._do_i_compile() is False


def test_teacher_is_exact_ema_and_centres(stepped):
    tr, before, seen = stepped["tr"], stepped["before"], stepped["seen"]
    m = cosine_momentum(before["it"], tr.mod_total_iterations, 0.996)
    assert m == stepped["outs"][1]["mod_momentum"] and tr.mod_it == before["it"] + 1 == 2
    student = dict(tr.network.encoder.named_parameters())
    student.update({f"head.{k}": v for k, v in tr.mod_student.head.named_parameters()})
    now = dict(tr.mod_teacher.named_parameters())
    assert len(now) > 0
    for name, p in now.items():
        s_name = name.replace("backbone.", "", 1) if name.startswith("backbone.") else name
        expected = m * before["teacher"][name] + (1 - m) * student[s_name].detach()
        assert torch.allclose(p, expected, atol=1e-7, rtol=1e-6), name
        assert not p.requires_grad and p.grad is None
    # centres: c = 0.9 c_old + 0.1 batch mean of the teacher logits of this step
    t_cls, t_patch = seen["teacher_out"]
    assert torch.allclose(tr.mod_centers.cls, 0.9 * before["centers"]["cls"] + 0.1 * t_cls.mean(0, keepdim=True),
                          atol=1e-6)
    assert torch.allclose(tr.mod_centers.patch,
                          0.9 * before["centers"]["patch"] + 0.1 * t_patch.mean((0, 1)).unsqueeze(0), atol=1e-6)


def test_step_masking_and_view_inputs(stepped):
    tr, seen = stepped["tr"], stepped["seen"]
    views, vmask = seen["views"], seen["vmask"]
    b = tr.batch_size
    assert views.shape[0] == 2 * b and vmask.shape == (2 * b, 1, *tr.configuration_manager.patch_size)
    grid, stride = tr.mod_grid, tr.mod_stride
    t = int(np.prod(grid))
    # one value per token block, exactly round(0.6 T) masked tokens per sample and view
    blocks = vmask.reshape(2 * b, grid[0], stride[0], grid[1], stride[1], grid[2], stride[2])
    assert torch.all(blocks.amax((2, 4, 6)) == blocks.amin((2, 4, 6)))
    tok = blocks.amax((2, 4, 6)).reshape(2 * b, -1).bool()
    assert torch.equal(tok.sum(1), torch.full((2 * b,), num_masked(t, 0.6)))
    assert all(torch.equal(tok[i].nonzero()[:, 0], seen["tidx"][i]) for i in range(2 * b))  # student head tokens
    # the teacher gets the unmasked views; the views share the geometry of the batch (intensity-only)
    assert torch.equal(seen["teacher_in"], views)
    x = stepped["batch"]["data"]
    assert not torch.equal(views[:b], x) and not torch.equal(views[b:], x)
    assert torch.corrcoef(torch.stack([views[:b].flatten(), x.flatten()]))[0, 1] > 0.5


def test_losses_finite_and_logged(stepped):
    for out in stepped["outs"]:
        for k in ("loss", "mod_seg", "mod_efm", "mod_cls", "mod_dp", "mod_entropy"):
            assert np.isfinite(out[k]), k
        o = stepped["tr"].nnx_opts
        total = o["lambda_seg"] * out["mod_seg"] + 1.5 * out["mod_efm"] + 0.5 * out["mod_cls"] + out["mod_dp"]
        assert math.isclose(float(out["loss"]), total, rel_tol=1e-4)
    assert 0 < stepped["outs"][0]["mod_entropy"] <= math.log(64) + 1e-6


def test_outputs_unchanged_after_deleting_mod_modules(stepped):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    tr = stepped["tr"]
    x = stepped["batch"]["data"][:1]
    tr.network.eval()
    tr.set_deep_supervision_enabled(False)
    with torch.no_grad():
        ref = tr.network(x)
    kept = (tr.mod_student, tr.mod_teacher, tr.mod_centers, tr._mod_train_module)
    try:
        tr.mod_student = tr.mod_teacher = tr.mod_centers = tr._mod_train_module = None
        import gc
        gc.collect()
        with torch.no_grad():
            assert torch.equal(tr.network(x), ref)
        stock = nnUNetTrainer.build_network_architecture(tr.plans_manager, tr.configuration_manager,
                                                         tr.num_input_channels,
                                                         tr.label_manager.num_segmentation_heads, False)
        stock.load_state_dict(tr.network.state_dict())             # strict
        stock.eval()
        with torch.no_grad():
            assert torch.equal(stock(x), ref)
    finally:
        tr.mod_student, tr.mod_teacher, tr.mod_centers, tr._mod_train_module = kept
        tr.set_deep_supervision_enabled(True)
        tr.network.train()


def test_checkpoint_round_trip(stepped, pp_folder, tmp_path, monkeypatch):
    tr = stepped["tr"]
    path = str(tmp_path / "ck.pth")
    os.makedirs(tr.output_folder, exist_ok=True)
    tr.save_checkpoint(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ck["network_weights"]) == set(tr.network.state_dict())
    ex = ck["nnx_extra"]
    assert ex["iteration"] == 2 and set(ex) >= {"student", "teacher", "centers", "config"}
    assert ck["nnx_trainer_name"] == "MODTrainer"
    tr2 = _make_trainer("MODTrainer", SMALL_HEAD, monkeypatch, pp_folder)
    tr2.load_checkpoint(path)
    assert tr2.mod_it == 2
    assert all(torch.equal(v, tr.mod_teacher.state_dict()[k]) for k, v in tr2.mod_teacher.state_dict().items())
    assert all(torch.equal(v, tr.mod_centers.state_dict()[k]) for k, v in tr2.mod_centers.state_dict().items())
    assert all(torch.equal(v, tr.mod_student.state_dict()[k]) for k, v in tr2.mod_student.state_dict().items())
    # a run with another head refuses the checkpoint
    tr3 = _make_trainer("MODTrainer", "out_dim=32 head_hidden=32 head_bottleneck=16", monkeypatch, pp_folder)
    from nnx.errors import NNXError
    with pytest.raises(NNXError, match="do not match"):
        tr3.load_checkpoint(path)


def test_variants(pp_folder, monkeypatch, one_thread):
    from nnx_plugins.mod.loss import DC_and_Focal_loss as DCF
    no_ot = _make_trainer("MODTrainer_noOT", "", monkeypatch, pp_folder)
    no_ot.initialize()
    assert no_ot.mod_teacher is None and no_ot.mod_student.head is None and no_ot.mod_student.dense_predictor
    out = no_ot.train_step(_batch(no_ot))
    assert np.isfinite(out["mod_dp"]) and np.isnan(out["mod_efm"])
    assert math.isclose(float(out["loss"]), out["mod_seg"] + out["mod_dp"], rel_tol=1e-4)
    no_dp = _make_trainer("MODTrainer_noDP", SMALL_HEAD + " seg_loss=dice_focal", monkeypatch, pp_folder)
    no_dp.initialize()
    assert no_dp.mod_student.dense_predictor is None and no_dp.mod_teacher is not None
    assert isinstance(no_dp.loss.loss, DCF)                        # paper's focal + Dice, stock DS weights
    paper = _make_trainer("MODTrainer_paperHP", SMALL_HEAD, monkeypatch, pp_folder)
    paper.initialize()
    assert isinstance(paper.optimizer, torch.optim.AdamW) and paper.initial_lr == 1e-3
    assert paper.optimizer.param_groups[0]["weight_decay"] == 0.05 and len(paper.optimizer.param_groups) == 2


def test_bad_options_fail_before_any_folder(monkeypatch, tmp_path):
    from nnx.errors import NNXError
    from nnx_plugins.mod.trainer import MODTrainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    for opts in ("mask_ratio=1.0", "mask_mode=grid", "lambda_ot=0 lambda_dp=0", "student_temp=0", "views=x",
                 "lambda_mod=0", "out_dim=0"):
        monkeypatch.setenv("NNX_TRAINER_OPTS", opts)
        with pytest.raises(NNXError):
            MODTrainer({"continue_training": False}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []


def test_bench_suite_is_valid():
    from nnx.bench.suite import load_suite
    s = load_suite("mod")
    assert s.seeds == 3 and s.dataset["phantom"] == "small" and any(a.trainer == "nnUNetTrainer" for a in s.arms)
    assert any(a.trainer == "MODTrainer" for a in s.arms)


# ------------------------------------------------------------------------------------------- end to end (CLI)
@pytest.mark.slow
def test_nnx_train_export_and_stock_prediction(tiny_planned, nnunet_env, tmp_path):
    """nnx_train (short CPU run incl. validation) -> nnx_export -> stock nnU-Net prediction from the exported
    folder; identical to nnx_predict. Also: stock nnU-Net finds the trainer through nnUNet_extTrainer."""
    import SimpleITK as sitk
    r = run_cli(nnx_cmd("train", str(TINY_ID), "3d_fullres", "0", "-tr", "MODTrainer", "-device", "cpu",
                        "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                        "--opt", *SMALL_HEAD.split()), env={"nnUNet_n_proc_DA": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = os.path.join(nnunet_env["nnUNet_results"], tiny_planned, "MODTrainer__nnUNetPlans__3d_fullres")
    ck = torch.load(os.path.join(out, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    ex = ck["nnx_extra"]
    assert ex["iteration"] == 2 and ex["teacher"] and ex["student"] and ex["centers"]
    assert not any(k.startswith(("mod", "head", "teacher", "dense")) for k in ck["network_weights"])
    log = ck["logging"]
    assert len(log["mod_loss_efm"]) == 1 and np.isfinite(log["mod_loss_dp"][0])
    with open(os.path.join(out, "fold_0", "nnx_config.json")) as f:
        assert '"out_dim": 64' in f.read()

    export = tmp_path / "exported"
    r = run_cli(nnx_cmd("export", "-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", "MODTrainer",
                        "-o", str(export)))
    assert r.returncode == 0, r.stderr[-3000:]
    ek = torch.load(export / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ek["trainer_name"] == "nnUNetTrainer" and "nnx_extra" not in ek

    raw = os.path.join(nnunet_env["nnUNet_raw"], tiny_planned)
    nnx_pred = tmp_path / "nnx_pred"
    r = run_cli(nnx_cmd("predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(nnx_pred), "-d", str(TINY_ID),
                        "-c", "3d_fullres", "-f", "0", "-tr", "MODTrainer", "-device", "cpu", "--disable_tta",
                        "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]

    # stock prediction from the exported folder, in a clean environment (no nnx variables, no extTrainer)
    stock_pred = tmp_path / "stock_pred"
    code = ("import sys, torch\n"
            "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
            "p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False,"
            " device=torch.device('cpu'), allow_tqdm=False)\n"
            "p.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))\n"
            "import os; os.makedirs(sys.argv[3], exist_ok=True)\n"
            "p.predict_from_files_sequential(sys.argv[2], sys.argv[3], False, True, None)\n")
    import subprocess
    import sys
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NNX_") and k != "nnUNet_extTrainer"}
    r = subprocess.run([sys.executable, "-c", code, str(export), os.path.join(raw, "imagesTs"), str(stock_pred)],
                       capture_output=True, text=True, env=clean, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = sorted(f for f in os.listdir(nnx_pred) if f.endswith(".nii.gz"))
    assert cases and cases == sorted(f for f in os.listdir(stock_pred) if f.endswith(".nii.gz"))
    for f in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(nnx_pred / f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(stock_pred / f)))
        assert np.array_equal(a, b), f"stock prediction of the exported model differs from nnx_predict on {f}"

    # stock nnUNetv2_train / _predict find MODTrainer through the shim (nnUNet_extTrainer) and build it with the
    # options from NNX_TRAINER_OPTS (same code path as nnx_train, which calls stock run_training)
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnx.ext_path import SHIM_DIR
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_extTrainer", SHIM_DIR)
        mp.setenv("NNX_TRAINER_OPTS", "out_dim=128")
        t = get_trainer_from_args(str(TINY_ID), "3d_fullres", 1, "MODTrainer", device=torch.device("cpu"))
    assert type(t).__module__ == "nnx_plugins.mod.trainer" and t.nnx_opts["out_dim"] == 128
