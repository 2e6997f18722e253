"""Tests of the cross-teaching family (``nnx_plugins.crossteach``: CrossTeachingTrainer, MCSCTrainer, MCSCv2Trainer):
the spec's CPU checks (spec 001 §8): losses against brute-force loops, balance properties, schedules, block groups,
MCSCv2 sampling and banks, stop-gradient on pseudo-labels, label hygiene of the unlabeled loader, the
self-describing inference network, a learning test, and nnx_predict vs stock nnU-Net prediction of a checkpoint.

Trainer tests use a reduced copy of the tiny phantom's plans (patch 16x32x32, U-Net widths 8..64) and a narrow
CS-Unet (csunet_embed_dim=16) so that a step costs about a second on one CPU thread."""
from __future__ import annotations

import copy
import json
import math
import os
import numpy as np
import pytest
import torch

from conftest import TINY_ID
from nnx_plugins.crossteach.certainty import (ClassMemoryBank, anchor_mask, class_ranks, entropy,
                                              entropy_threshold, negative_mask)
from nnx_plugins.crossteach.losses import balanced_supcon_loss, certainty_contrast_loss, cps_dice_loss
from nnx_plugins.crossteach.network import DualNet
from nnx_plugins.crossteach.sampling import block_group_positions, resample_nearest, to_blocks
from nnx_plugins.crossteach.schedules import PerGroupPolyLR, cps_weight, sigmoid_rampup, uncertain_fraction

PLANS = "nnUNetPlans_crossteachtest"
SMALL = "csunet_embed_dim=16 labeled=3"


def _normed(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


# ------------------------------------------------------------------------------------------------- losses
def _bcl_brute(f, y, tau):
    """Eq. 4.2 by double loop (anchor excluded from its own class' denominator, as in the MCSC code)."""
    n = len(y)
    total = 0.0
    for i in range(n):
        pos = [p for p in range(n) if y[p] == y[i] and p != i]
        if not pos:
            continue
        den = 0.0
        for j in set(y.tolist()):
            keys = [k for k in range(n) if y[k] == j and k != i]
            if keys:
                den += sum(math.exp(float(f[i] @ f[k]) / tau) for k in keys) / len(keys)
        total += sum(math.log(math.exp(float(f[i] @ f[p]) / tau) / den) for p in pos) / len(pos)
    return -total / n


def test_balanced_supcon_matches_brute_force_and_is_order_invariant():
    g = torch.Generator().manual_seed(0)
    f = _normed(50, 8, g)
    y = torch.randint(0, 3, (50,), generator=g)
    y[0] = 3  # a class with a single member: no positive, contributes 0 but counts in |A|
    got = float(balanced_supcon_loss(f, y, 0.1))
    assert abs(got - _bcl_brute(f, y, 0.1)) < 1e-5
    perm = torch.randperm(50, generator=g)
    assert abs(float(balanced_supcon_loss(f[perm], y[perm], 0.1)) - got) < 1e-5
    # perfectly clustered (one-hot class embeddings) beats random features
    clustered = torch.nn.functional.one_hot(y, 8).double()
    assert float(balanced_supcon_loss(clustered, y, 0.1)) < got


def _bcl_anchor(f, y, i, tau):
    """Eq. 4.2's term of anchor i (brute force)."""
    pos = [p for p in range(len(y)) if y[p] == y[i] and p != i]
    den = 0.0
    for j in set(y.tolist()):
        keys = [k for k in range(len(y)) if y[k] == j and k != i]
        if keys:
            den += sum(math.exp(float(f[i] @ f[k]) / tau) for k in keys) / len(keys)
    return -sum(math.log(math.exp(float(f[i] @ f[p]) / tau) / den) for p in pos) / len(pos)


def test_balanced_supcon_is_class_balanced():
    """Each class enters an anchor's denominator through its mean: duplicating every class-1 feature x5 leaves the
    class-0 anchors' terms unchanged, whereas plain SupCon's sum over keys changes."""
    g = torch.Generator().manual_seed(1)
    f = _normed(12, 4, g)
    y = torch.tensor([0] * 6 + [1] * 6)
    fd = torch.cat([f[:6], f[6:].repeat(5, 1)])
    yd = torch.cat([y[:6], y[6:].repeat(5)])
    for i in range(6):
        assert abs(_bcl_anchor(f, y, i, 0.1) - _bcl_anchor(fd, yd, i, 0.1)) < 1e-9
    # the vectorised loss agrees with the per-anchor brute force on the duplicated set
    brute = sum(_bcl_anchor(fd, yd, i, 0.1) for i in range(len(yd))) / len(yd)
    assert abs(float(balanced_supcon_loss(fd, yd, 0.1)) - brute) < 1e-6

    def supcon(ff, i):  # unbalanced SupCon term of anchor i (sum over all other keys)
        s = ff @ ff.t() / 0.1
        keys = [k for k in range(len(ff)) if k != i]
        return float(-(s[i, [p for p in range(6) if p != i]] - torch.logsumexp(s[i, keys], 0)).mean())

    assert abs(supcon(f, 0) - supcon(fd, 0)) > 1e-3


def _v2_brute(anchors, pos, negs, neg_lab, tau):
    terms = []
    for c in anchors:
        if c not in negs or len(negs[c]) == 0 or len(anchors[c]) == 0:
            continue
        s = 0.0
        for a in anchors[c]:
            z = 0.0
            for j in set(neg_lab[c].tolist()):
                keys = [k for k in range(len(neg_lab[c])) if neg_lab[c][k] == j]
                z += sum(math.exp(float(a @ negs[c][k]) / tau) for k in keys) / len(keys)
            e = math.exp(float(a @ pos[c]) / tau)
            s += math.log(e / (e + z))
        terms.append(-s / len(anchors[c]))
    return sum(terms) / len(terms)


def test_certainty_contrast_loss_brute_force_balance_and_empty_classes():
    g = torch.Generator().manual_seed(2)
    anchors = {0: _normed(7, 6, g), 1: _normed(5, 6, g), 2: _normed(4, 6, g), 3: _normed(0, 6, g)}
    pos = {c: a.mean(0) if len(a) else torch.zeros(6, dtype=torch.float64) for c, a in anchors.items()}
    negs = {0: _normed(9, 6, g), 1: _normed(6, 6, g), 3: _normed(3, 6, g)}       # class 2: empty bank
    neg_lab = {0: torch.tensor([1, 1, 2, 2, 2, 3, 3, 3, 3]), 1: torch.tensor([0, 0, 0, 2, 3, 3]),
               3: torch.tensor([0, 1, 2])}
    got = certainty_contrast_loss(anchors, pos, negs, neg_lab, 0.1)
    assert abs(float(got) - _v2_brute(anchors, pos, negs, neg_lab, 0.1)) < 1e-5   # classes 2, 3 skipped
    # balance (Eq. 5.7): duplicating the class-1 negatives of bank 0 x5 leaves the loss unchanged
    dup = dict(negs)
    dup_lab = dict(neg_lab)
    m = neg_lab[0] == 1
    dup[0] = torch.cat([negs[0]] + [negs[0][m]] * 4)
    dup_lab[0] = torch.cat([neg_lab[0]] + [neg_lab[0][m]] * 4)
    assert abs(float(certainty_contrast_loss(anchors, pos, dup, dup_lab, 0.1)) - float(got)) < 1e-6
    assert certainty_contrast_loss({0: anchors[0]}, pos, {}, {}, 0.1) is None        # nothing to contrast


def test_cps_dice_by_hand():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]]).permute(0, 2, 1).reshape(1, 2, 2)   # (B=1, C=2, 2 voxels)
    y = torch.tensor([[0, 1]])
    p = torch.softmax(logits, 1)[0]
    dice = []
    for c in range(2):
        yc = (y[0] == c).float()
        dice.append(1 - (2 * (p[c] * yc).sum() + 1e-5) / ((p[c] ** 2).sum() + yc.sum() + 1e-5))
    assert torch.allclose(cps_dice_loss(logits, y), torch.stack(dice).mean())


# ---------------------------------------------------------------------------------------------- schedules
def test_schedules():
    t_total = 40000
    assert math.isclose(cps_weight(0, t_total), 0.1 * math.exp(-5), rel_tol=1e-9)           # 6.74e-4
    assert abs(cps_weight(0, t_total) - 6.74e-4) < 1e-6
    assert math.isclose(cps_weight(t_total, t_total), 0.1)
    assert math.isclose(cps_weight(t_total // 2, t_total), 0.1 * math.exp(-1.25))            # 0.0287
    assert math.isclose(cps_weight(30000, t_total, rampup_fraction=0.75), 0.1)               # MCSC code variant
    assert sigmoid_rampup(5, 0) == 1.0 and cps_weight(7, 100, rampup_fraction=0.0) == 0.1
    assert math.isclose(uncertain_fraction(0, 100), 0.2) and math.isclose(uncertain_fraction(50, 100), 0.1)
    assert uncertain_fraction(100, 100) == 0.0
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [a], "lr": 5e-4}, {"params": [b], "lr": 1e-4}])
    sched = PerGroupPolyLR(opt, 100)
    for t in (1, 37, 99):
        sched.step(t)
        la, lb = (g["lr"] for g in opt.param_groups)
        assert math.isclose(la, 5e-4 * (1 - t / 100) ** 0.9) and math.isclose(la / lb, 5.0)
    sched.load_state_dict({"t": 10, "total": 100, "exponent": 0.9})
    assert math.isclose(opt.param_groups[1]["lr"], 1e-4 * 0.9 ** 0.9)


# --------------------------------------------------------------------------------------------- sampling
def test_block_groups_one_block_per_map_and_no_background_group():
    g = torch.Generator().manual_seed(3)
    labels = torch.zeros(4, 6, 8, 8, dtype=torch.long)
    labels[1, 2:4, 0:4, 4:8] = 2                  # foreground only in one block of map 1 (any z offset)
    labels[3, 3:5, 2:6, 2:6] = -1                 # ignored voxels
    pos, lab = block_group_positions(labels, 4, 100, g)
    m, n_groups, v = pos.shape
    assert m == 4 and v == 4 * 4 * 4              # (4, 4, 4) blocks, 1 x 2 x 2 per map
    flat = labels.reshape(4, -1)
    assert torch.equal(torch.gather(flat, 1, pos.reshape(4, -1)).reshape(pos.shape), lab)
    # every kept group has a non-background, non-ignored voxel; the foreground block sits in exactly one group
    assert n_groups == 1 and ((lab > 0).any(2).any(0)).all()
    for i in range(4):  # each map contributes one whole block (contiguous box of voxels)
        z, rem = pos[i, 0] // 64, pos[i, 0] % 64
        yx = torch.stack([rem // 8, rem % 8])
        assert (z.max() - z.min()) < 4 and (yx[0].max() - yx[0].min()) == 3 and (yx[1].max() - yx[1].min()) == 3
    many = torch.randint(0, 3, (4, 8, 8, 8), generator=g)
    pos, lab = block_group_positions(many, 4, 3, g)
    assert pos.shape == (4, 3, 64)


def test_block_shape_and_resampling():
    x = torch.arange(2 * 4 * 4).view(1, 1, 2, 4, 4)
    b = to_blocks(x, (1, 2, 2), (0, 0, 0))
    assert b.shape == (1, 8, 4, 1) and b[0, 0, :, 0].tolist() == [0, 1, 4, 5]
    y = torch.tensor([[[0, 1], [2, 3]]])
    up = resample_nearest(y, (4, 4))
    assert up.dtype == y.dtype and up[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert torch.equal(resample_nearest(up, (2, 2)), y)


# ------------------------------------------------------------------------------------------------ MCSCv2
def test_uncertain_fraction_and_anchor_selection():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(3 * torch.randn(4, 4, 20, 30, generator=g), 1)
    ent = entropy(probs)
    assert torch.allclose(ent, -(probs * probs.log()).sum(1), atol=1e-6)
    for beta in (0.05, 0.2, 0.5):
        gamma = entropy_threshold(ent, beta, max_samples=10 ** 7)
        assert abs(float((ent > gamma).float().mean()) - beta) < 0.01
        sub = entropy_threshold(ent, beta, max_samples=1000, generator=g)   # subsampled percentile
        assert abs(float((ent > sub).float().mean()) - beta) < 0.05
    assert entropy_threshold(ent, 0.0) == float("inf")
    gamma = entropy_threshold(ent, 0.2)
    unl = torch.zeros(4, 20, 30, dtype=torch.bool)
    unl[2:] = True
    am = anchor_mask(probs.amax(1), ent, unl, 0.9, gamma)
    assert am.any() and (probs.amax(1)[am] > 0.9).all() and (ent[am & unl] <= gamma).all()
    labeled_confident = ~unl & (probs.amax(1) > 0.9)
    assert torch.equal(am[~unl], labeled_confident[~unl])   # labeled voxels: confidence only


def test_negative_rank_rules_by_hand():
    """C = 4, r^l = 1, r^h = 2; P = (0.1, 0.5, 0.3, 0.1) -> ranks O = (2, 0, 1, 3)."""
    p = torch.tensor([0.1, 0.5, 0.3, 0.1]).view(1, 4, 1)
    ranks = class_ranks(p)[0, :, 0]
    assert ranks.tolist() == [2, 0, 1, 3] or ranks.tolist() == [3, 0, 1, 2]   # tie between classes 0 and 3
    ranks = torch.tensor([2, 0, 1, 3])

    def neg(c, label, unlabeled, uncertain):
        ent = torch.tensor([1.0 if uncertain else 0.0])
        return bool(negative_mask(c, torch.tensor([label]), ranks[c].view(1), ent, torch.tensor([unlabeled]),
                                  0.5, 1, 2, 4)[0])

    # labeled (5.5): y != c and O(c) < 1, i.e. predicted c but labelled otherwise
    assert neg(1, 2, False, False) and not neg(1, 1, False, False) and not neg(2, 1, False, False)
    # unlabeled certain (5.6, second clause): O(c) >= 1 -> negative for every class but the top-1
    assert [neg(c, 1, True, False) for c in range(4)] == [True, False, True, True]
    # unlabeled uncertain (first clause): 2 <= O(c) <= C -> only the classes ranked low
    assert [neg(c, 1, True, True) for c in range(4)] == [True, False, False, True]
    assert not neg(0, -1, False, False) and not neg(0, -1, True, False)   # ignored voxels never


def test_memory_bank_fifo_and_per_class_negatives():
    g = torch.Generator().manual_seed(5)
    bank = ClassMemoryBank(3, size=20, dim=4, push_fraction=0.25)
    assert bank.max_push == 5
    f = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    assert bank.push(0, f, torch.full((12,), 2), g) == 5          # at most t_b * K per update
    pushes = [f[k:k + 4] + 100 * (k + 1) for k in range(6)]
    for x in pushes:
        bank.push(0, x, torch.full((4,), 1), g)
    feats, labels = bank.get(0)
    assert feats.shape[0] == 20 == bank.count[0]                   # size <= K
    # FIFO: 5 + 24 entries went in, so the first push and the first 4-entry push are gone, the rest is kept
    kept = sorted(tuple(r.tolist()) for r in feats.float())
    assert kept == sorted(tuple(r.tolist()) for x in pushes[1:] for r in x) and (labels == 1).all()
    s, sl = bank.sample(0, 7, g)
    assert s.shape == (7, 4) and (sl == 1).all()
    assert bank.count[1] == 0 and bank.sample(1, 7, g)[0].shape[0] == 0
    state = bank.state_dict()
    other = ClassMemoryBank(3, size=20, dim=4)
    other.load_state_dict(state)
    assert torch.equal(other.get(0)[0], bank.get(0)[0]) and other.ptr == bank.ptr


def test_one_projection_pass_gives_the_class_means_and_the_bank_rows():
    """MCSCv2 projects every anchor (class means) and every bank candidate in one chunked no-grad pass: the class
    sums and counts and the kept rows equal the brute-force projections, whatever the chunk size."""
    from nnx_plugins.crossteach.heads import stream_projections
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    feats = torch.randn(1000, 5, generator=g)
    calls = []

    def project(i):
        calls.append(i.numel())
        return torch.nn.functional.normalize(feats[i] @ w, dim=-1)

    idx = torch.unique(torch.randint(0, 1000, (600,), generator=g))
    labels = torch.randint(0, 4, (idx.numel(),), generator=g)
    is_mean = torch.rand(idx.numel(), generator=g) > 0.3
    keep = idx[torch.rand(idx.numel(), generator=g) > 0.5]
    for chunk in (1, 7, 64, 10000):
        calls.clear()
        sums, counts, kept = stream_projections(project, idx, labels, is_mean, keep, 5, 7, chunk)
        assert sum(calls) == idx.numel()                                   # each voxel projected once
        for c in range(5):
            m = is_mean & (labels == c)
            assert int(counts[c]) == int(m.sum())
            want = project(idx[m]).sum(0) if m.any() else torch.zeros(7)
            assert torch.allclose(sums[c], want, atol=1e-5), (chunk, c)
        assert torch.allclose(kept, project(keep), atol=1e-6)
    kept16 = stream_projections(project, idx, labels, is_mean, keep, 5, 7, 64, keep_dtype=torch.float16)[2]
    assert kept16.dtype == torch.float16 and torch.equal(kept16, project(keep).half())


# ------------------------------------------------------------------------------------ inference network
def _tiny_unet(seed):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    torch.manual_seed(seed)
    return PlainConvUNet(1, 3, (4, 8, 8), torch.nn.Conv3d, 3, (1, 2, 2), 1, 3, 1, True, torch.nn.InstanceNorm3d,
                         {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True})


def test_dualnet_modes_and_self_describing_weights():
    a, b = _tiny_unet(0), _tiny_unet(1)
    rebuilt = []

    def rebuild(cfg):
        rebuilt.append(cfg["second"])
        return _tiny_unet(7)

    net = DualNet(a, b, {"second": "cnn", "infer_mode": "mean"}, rebuild).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        pa, pb = torch.softmax(a(x), 1), torch.softmax(b(x), 1)
        assert torch.allclose(torch.softmax(net(x), 1), (pa + pb) / 2, atol=1e-6)   # 'mean' = mean softmax
        net.set_infer_mode("second")
        assert torch.equal(net(x), b(x))
        net.set_infer_mode("cnn")
        assert torch.equal(net(x), a(x))
    state = net.state_dict()
    assert state["_extra_state"]["second"] == "cnn" and state["_extra_state"]["infer_mode"] == "cnn"
    # a DualNet built with the default configuration (as stock prediction does) rebuilds b from the weights
    other = DualNet(_tiny_unet(3), torch.nn.Linear(2, 2), {"second": "csunet"}, rebuild)
    other.load_state_dict(state)
    assert rebuilt == ["cnn"] and other.config["second"] == "cnn" and other.infer_mode == "cnn"
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(x), net(x))
    net.decoder.deep_supervision = True
    assert a.decoder.deep_supervision and b.decoder.deep_supervision


# ---------------------------------------------------------------------------------------- trainer tests
@pytest.fixture(scope="module")
def ct_env(tiny_planned, nnunet_env):
    """A reduced plans file for the tiny phantom (same preprocessed data) and one CPU thread."""
    pp = os.path.join(nnunet_env["nnUNet_preprocessed"], tiny_planned)
    with open(os.path.join(pp, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    c = plans["configurations"]["3d_fullres"]
    c["patch_size"], c["batch_size"] = [16, 32, 32], 2
    c["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]
    plans["plans_name"] = PLANS
    with open(os.path.join(pp, PLANS + ".json"), "w") as f:
        json.dump(plans, f)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield pp
    torch.set_num_threads(n)
    os.remove(os.path.join(pp, PLANS + ".json"))  # other tests see the session's folder as nnx_plan left it


def _make(name, opts, mp, pp):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx.registry import load_trainer
    mp.setenv("NNX_TRAINER_OPTS", opts)
    mp.setenv("nnUNet_n_proc_DA", "0")
    plans = load_json(os.path.join(pp, PLANS + ".json"))
    plans["continue_training"] = False
    return load_trainer(name)(plans, "3d_fullres", 0, load_json(os.path.join(pp, "dataset.json")),
                              torch.device("cpu"))


@pytest.fixture(scope="module")
def mcsc(ct_env):
    """An MCSCTrainer (CS-Unet second network) after on_train_start, its loader and one real batch."""
    mp = pytest.MonkeyPatch()
    try:
        tr = _make("MCSCTrainer", SMALL + " cl_groups=4 epochs=4 iters_per_epoch=10", mp, ct_env)
        tr.on_train_start()
        tr.on_epoch_start()
        tr.on_train_epoch_start()
        batch = next(tr.dataloader_train)
        yield {"tr": tr, "batch": batch, "mp": mp}
    finally:
        mp.undo()


def _snapshot(tr):
    return {"net": copy.deepcopy(tr.network.state_dict()), "proj": copy.deepcopy(tr.ct_projectors.state_dict()),
            "opt": copy.deepcopy(tr.optimizer.state_dict()), "it": tr.ct_it, "gen": tr.ct_gen.get_state(),
            "rng": torch.get_rng_state()}


def _restore(tr, s):
    tr.network.load_state_dict(s["net"])
    tr.ct_projectors.load_state_dict(s["proj"])
    tr.optimizer.load_state_dict(s["opt"])
    tr.ct_it = s["it"]
    tr.ct_gen.set_state(s["gen"])
    torch.set_rng_state(s["rng"])


def test_stop_gradient_and_cross_labels(mcsc):
    tr, batch = mcsc["tr"], mcsc["batch"]
    xl, xu, target = tr._ct_batch(batch)
    bl = xl.shape[0]
    out = tr._ct_train_module(torch.cat([xl, xu]), features=True)
    parts = tr.ct_losses(out, target, bl)
    from nnx_plugins.crossteach.network import full_resolution
    fa, fb = full_resolution(out["a"]), full_resolution(out["b"])
    # each network is taught by the OTHER network's hard prediction on the unlabeled images
    assert torch.equal(parts["yb_u"], fb[bl:].argmax(1)) and torch.equal(parts["ya_u"], fa[bl:].argmax(1))
    assert torch.allclose(parts["cps_a"], cps_dice_loss(fa[bl:], fb[bl:].argmax(1)))
    tr.optimizer.zero_grad(set_to_none=True)
    parts["cps_a"].backward(retain_graph=True)
    assert all(p.grad is None for p in tr.dual.b.parameters())          # pseudo-labels carry no gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.dual.a.parameters())
    tr.optimizer.zero_grad(set_to_none=True)
    parts["cps_b"].backward(retain_graph=True)
    assert all(p.grad is None for p in tr.dual.a.parameters())
    # CroLab: CNN maps of unlabeled images carry the second network's pseudo-labels and vice versa
    la, lb = tr.ct_cross_labels(tr._ct_labels_full(target), parts, labeled_only=False)
    assert torch.equal(la[bl:], parts["yb_u"]) and torch.equal(lb[bl:], parts["ya_u"])
    assert torch.equal(la[:bl], lb[:bl])
    # the contrastive loss reaches both networks and the projectors, but not the segmentation heads' pseudo-labels
    tr.optimizer.zero_grad(set_to_none=True)
    l_cl = tr.ct_contrast_loss(out["features"], tr._ct_labels_full(target), parts, bl)
    l_cl.backward()
    assert torch.isfinite(l_cl) and float(l_cl.detach()) > 0
    for mod in (tr.dual.a, tr.dual.b, tr.ct_projectors):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())
    tr.optimizer.zero_grad(set_to_none=True)


def test_unlabeled_labels_never_read(mcsc, monkeypatch):
    """Label hygiene: the unlabeled loader samples without foreground oversampling and never opens a seg file;
    garbage 'labels' attached to the unlabeled batch change neither the loss nor the update."""
    import blosc2
    tr, batch = mcsc["tr"], mcsc["batch"]
    dl = tr.dataloader_train.data_loader if hasattr(tr.dataloader_train, "data_loader") else tr.dataloader_train
    fd = tr._nnx_fold
    assert dl.unlabeled is not None and dl.unlabeled.oversample_foreground_percent == 0.0
    assert dl.oversample_foreground_percent == pytest.approx(0.33)
    assert set(fd.unlabeled) and not set(fd.unlabeled) & set(fd.train) and len(fd.train) == 3
    opened = []
    real = blosc2.open

    def rec(urlpath=None, *a, **kw):
        opened.append(str(urlpath))
        return real(urlpath, *a, **kw)

    monkeypatch.setattr(blosc2, "open", rec)
    keys = set()
    for _ in range(3):
        b = next(tr.dataloader_train)
        keys.update(b["unlabeled"]["keys"])
        assert "target" not in b["unlabeled"]
    monkeypatch.undo()
    assert keys and keys <= set(fd.unlabeled)
    assert not [p for p in opened if any(p.endswith(c + "_seg.b2nd") for c in fd.unlabeled)]
    snap = _snapshot(tr)
    ref = tr.train_step(batch)
    after = {k: v.clone() for k, v in tr.network.state_dict().items() if torch.is_tensor(v)}
    _restore(tr, snap)
    bad = dict(batch, unlabeled=dict(batch["unlabeled"]))
    g = torch.Generator().manual_seed(0)
    shape = (batch["unlabeled"]["data"].shape[0], 1, *batch["unlabeled"]["data"].shape[2:])
    bad["unlabeled"]["target"] = torch.randint(0, 7, shape, generator=g).short()
    bad["unlabeled"]["seg"] = bad["unlabeled"]["target"]
    got = tr.train_step(bad)
    assert float(got["loss"]) == float(ref["loss"]) and got["ct_cl"] == ref["ct_cl"]
    for k, v in tr.network.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, after[k]), k
    _restore(tr, snap)


def test_inference_network_has_no_heads_and_optimizer_groups(mcsc):
    tr = mcsc["tr"]
    net_ids = {id(p) for p in tr.network.parameters()}
    assert not net_ids & {id(p) for p in tr.ct_projectors.parameters()}
    assert not any(k.startswith(("projector", "head")) for k in tr.network.state_dict())
    names = [g["name"] for g in tr.optimizer.param_groups]
    assert names == ["cnn", "second", "proj"] and isinstance(tr.optimizer, torch.optim.AdamW)
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [5e-4, 1e-4, 5e-4]
    assert tr.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert tr.ct_tap_info["a"]["full"]["stride"] == [1, 1, 1] and tr.ct_tap_info["a"]["coarse"]["stride"] == [2, 4, 4]
    assert type(tr.dual.b).__name__ == "CSUNet" and tr.dual.b.config["csunet_embed_dim"] == 16
    assert not tr.nnx_inference_network_is_stock


def test_learning_on_the_tiny_phantom(mcsc):
    """A few steps on one real batch: both networks' supervised losses go down, all terms stay finite, the
    schedules advance."""
    tr, batch = mcsc["tr"], mcsc["batch"]
    snap = _snapshot(tr)
    outs = [tr.train_step(batch) for _ in range(6)]
    for o in outs:
        assert all(np.isfinite(o[k]) for k in ("loss", "ct_sup_a", "ct_sup_b", "ct_cps_a", "ct_cps_b", "ct_cl"))
    assert outs[-1]["ct_sup_a"] < outs[0]["ct_sup_a"] - 0.05 and outs[-1]["ct_sup_b"] < outs[0]["ct_sup_b"]
    assert outs[-1]["ct_w_cps"] > outs[0]["ct_w_cps"]
    assert math.isclose(outs[0]["ct_w_cps"], cps_weight(snap["it"], 40))
    lr = tr.optimizer.param_groups
    assert math.isclose(lr[0]["lr"] / lr[1]["lr"], 5.0) and math.isclose(lr[0]["lr"], 5e-4 * (1 - tr.ct_it / 40) ** 0.9)
    _restore(tr, snap)


def test_checkpoint_reload_in_stock_predictor(mcsc, monkeypatch):
    """The checkpoint loads into the network that stock nnU-Net's predictor builds (default options, no trainer
    options anywhere) and gives the trained network's output; extra state round-trips."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnx.ext_path import SHIM_DIR
    tr = mcsc["tr"]
    tr.ct_it = 5
    path = os.path.join(tr.output_folder, "checkpoint_final.pth")
    tr.save_checkpoint(path)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    assert ck["nnx_extra"]["iteration"] == 5 and "projectors" in ck["nnx_extra"]
    assert ck["network_weights"]["_extra_state"]["second_options"]["csunet_embed_dim"] == 16
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    monkeypatch.delenv("NNX_TRAINER_OPTS", raising=False)
    p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(os.path.dirname(tr.output_folder), (0,))
    x = torch.randn(1, tr.num_input_channels, 16, 32, 32)
    tr.network.eval()
    tr.set_deep_supervision_enabled(False)
    p.network.eval()
    with torch.no_grad():
        assert torch.equal(p.network(x), tr.network(x))
        assert p.network.b.config == tr.dual.b.config
    tr.set_deep_supervision_enabled(True)
    tr.network.train()
    tr2 = _make("MCSCTrainer", SMALL + " cl_groups=4 epochs=4 iters_per_epoch=10", monkeypatch, mcsc["tr"].
                preprocessed_dataset_folder_base)
    tr2.load_checkpoint(path)
    assert tr2.ct_it == 5 and all(torch.equal(v, tr.ct_projectors.state_dict()[k])
                                  for k, v in tr2.ct_projectors.state_dict().items())
    # a run whose second network differs cannot continue from the checkpoint (its optimizer holds the old one)
    tr3 = _make("MCSCTrainer", "csunet_embed_dim=8 labeled=3 cl_groups=4", monkeypatch,
                mcsc["tr"].preprocessed_dataset_folder_base)
    with pytest.raises(RuntimeError, match="another second network"):
        tr3.load_checkpoint(path)


def test_export_of_the_cnn_runs_in_plain_nnunet(mcsc, tmp_path, monkeypatch, capsys):
    """infer_mode=cnn: nnx_export writes the CNN alone, which stock nnU-Net's predictor loads WITHOUT nnx (no
    nnUNet_extTrainer) and runs with the DualNet's inference output; infer_mode=mean cannot be exported (one-line
    error naming the checkpoint, no output folder)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnx.cli.export import main as nnx_export
    tr = mcsc["tr"]
    ckpt = os.path.join(tr.output_folder, "checkpoint_final.pth")
    tr.save_checkpoint(ckpt)
    out = tmp_path / "exported"
    args = ["-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", "MCSCTrainer", "-p", PLANS, "-o", str(out)]
    assert nnx_export(args) == 0
    ck = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "nnUNetTrainer" and ck["nnx_trainer_name"] == "MCSCTrainer"
    assert "nnx_extra" not in ck and not any(k.startswith(("a.", "b.", "_extra")) for k in ck["network_weights"])
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    monkeypatch.delenv("NNX_TRAINER_OPTS", raising=False)
    p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(out), (0,))
    assert type(p.network) is PlainConvUNet
    x = torch.randn(1, tr.num_input_channels, 16, 32, 32)
    tr.network.eval()
    tr.set_deep_supervision_enabled(False)
    p.network.eval()
    try:
        with torch.no_grad():
            assert torch.equal(p.network(x), tr.network(x))
    finally:
        tr.set_deep_supervision_enabled(True)
        tr.network.train()
    tr.dual.set_infer_mode("mean")
    try:
        tr.save_checkpoint(ckpt)
    finally:
        tr.dual.set_infer_mode("cnn")
    capsys.readouterr()
    out2 = tmp_path / "exported_mean"
    assert nnx_export(args[:-1] + [str(out2)]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "infer_mode='mean'" in err[0] and ckpt in err[0]
    assert not out2.exists() and not any(f.name.startswith(out2.name) for f in tmp_path.iterdir())


def test_mcscv2_step_banks_and_certainty(ct_env, monkeypatch):
    tr = _make("MCSCv2Trainer", SMALL + " v2_bank_size=400 epochs=2 iters_per_epoch=5", monkeypatch, ct_env)
    tr.initialize()
    tr.do_split()
    g = torch.Generator().manual_seed(0)
    patch = tr.configuration_manager.patch_size
    x = torch.randn(2, tr.num_input_channels, *patch, generator=g)
    t = torch.randint(0, 7, (2, 1, *patch), generator=g).short()
    import torch.nn.functional as F
    targets = [t if all(i == 1 for i in s) else F.interpolate(t.float(), scale_factor=s, mode="nearest").short()
               for s in tr._get_deep_supervision_scales()]
    batch = {"data": x, "target": targets, "unlabeled": {"data": torch.randn(2, *x.shape[1:], generator=g)}}
    o1 = tr.train_step(batch)
    assert o1["ct_cl"] == 0.0                              # banks empty at the first step: nothing to contrast
    assert all(len(b) > 0 for b in tr.ct_banks.values())
    for scale, bank in tr.ct_banks.items():                # the negatives of class c never carry label c
        for c in range(bank.num_classes):
            _, lab = bank.get(c)
            assert not (lab == c).any() and bank.count[c] <= 400
    o2 = tr.train_step(batch)
    assert np.isfinite(o2["ct_cl"]) and o2["ct_cl"] > 0
    # beta(t) of the unlabeled voxels are uncertain under the threshold the step used
    parts = {"pa": torch.softmax(torch.randn(4, 7, 8, 8, generator=g), 1),
             "pb": torch.softmax(torch.randn(4, 7, 8, 8, generator=g), 1)}
    parts["ya_u"], parts["yb_u"] = parts["pa"][2:].argmax(1), parts["pb"][2:].argmax(1)
    cert = tr.ct_certainty(torch.randint(0, 7, (2, 8, 8), generator=g), parts, 2, False)
    ent_u = torch.cat([entropy(parts["pa"][2:]), entropy(parts["pb"][2:])])
    assert abs(float((ent_u > cert["gamma"]).float().mean()) - tr.ct_beta()) < 0.01
    assert torch.equal(cert["maxprob"][:4], parts["pb"].amax(1))          # CNN maps: the second net's P
    assert tr.ct_rank_high == 5                                           # C = 7: max(2, C - 2)
    assert "banks" not in tr.nnx_extra_state()


def test_bad_options_fail_before_any_folder(monkeypatch, tmp_path):
    from nnx.errors import NNXError
    from nnx_plugins.crossteach.trainer import MCSCTrainer, MCSCv2Trainer
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    for cls, opts in ((MCSCTrainer, "cl_scales=full,mid"), (MCSCTrainer, "cps_weight=-1"),
                      (MCSCTrainer, "second_network=vit"), (MCSCTrainer, "infer_mode=max"),
                      (MCSCTrainer, "lr_second=0"), (MCSCv2Trainer, "v2_conf=1.5"),
                      (MCSCv2Trainer, "v2_push_fraction=0"), (MCSCTrainer, "csunet_depths=x")):
        monkeypatch.setenv("NNX_TRAINER_OPTS", opts)
        with pytest.raises(NNXError):
            cls({"continue_training": False}, "3d_fullres", 0, {}, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []


def test_bench_suite_is_valid():
    from nnx.bench.suite import load_suite
    s = load_suite("crossteach")
    assert s.seeds == 3 and s.dataset["phantom"] == "small"
    trainers = {a.trainer for a in s.arms}
    assert {"nnUNetTrainer", "CrossTeachingTrainer", "MCSCTrainer", "MCSCv2Trainer", "CSUNetTrainer"} <= trainers
    labeled = {a.options.get("labeled") for a in s.arms}
    assert {"10%", "25%"} <= labeled


# ------------------------------------------------------------------------------------------- end to end
def test_stock_nnunet_builds_the_trainer_through_the_shim(ct_env, monkeypatch):
    """Stock nnUNetv2_train finds the trainers through nnUNet_extTrainer and applies NNX_TRAINER_OPTS."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnx.ext_path import SHIM_DIR
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    monkeypatch.setenv("NNX_TRAINER_OPTS", "second_network=cnn infer_mode=mean cl_groups=3")
    t = get_trainer_from_args(str(TINY_ID), "3d_fullres", 1, "MCSCTrainer", PLANS, device=torch.device("cpu"))
    assert type(t).__module__ == "nnx_plugins.crossteach.trainer"
    assert t.ct_network_config() == {"second": "cnn", "second_options": {}, "infer_mode": "mean"}
    assert t.nnx_opts["cl_groups"] == 3


@pytest.mark.slow
def test_nnx_predict_equals_stock_prediction(mcsc, tiny_planned, nnunet_env, tmp_path, monkeypatch):
    """The trained checkpoint (non-default CS-Unet width, infer_mode=mean set after training) predicts the test
    images identically through nnx_predict and through stock nnU-Net's predictor (nnUNet_extTrainer, no NNX_*
    variable), which rebuilds the network without any trainer option."""
    import SimpleITK as sitk
    tr = mcsc["tr"]
    tr.dual.set_infer_mode("mean")
    try:
        tr.save_checkpoint(os.path.join(tr.output_folder, "checkpoint_final.pth"))
    finally:
        tr.dual.set_infer_mode("cnn")
    raw = os.path.join(nnunet_env["nnUNet_raw"], tiny_planned)
    nnx_pred, stock_pred = tmp_path / "nnx_pred", tmp_path / "stock_pred"
    from nnx.cli.predict import main as nnx_predict
    assert nnx_predict(["-i", os.path.join(raw, "imagesTs"), "-o", str(nnx_pred), "-d", str(TINY_ID), "-c",
                        "3d_fullres", "-f", "0", "-tr", "MCSCTrainer", "-p", PLANS, "-device", "cpu",
                        "--disable_tta", "--quiet"]) == 0
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnx.ext_path import SHIM_DIR
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    for k in [k for k in os.environ if k.startswith("NNX_") and k != "NNX_HOME"]:
        monkeypatch.delenv(k)
    p = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"),
                        allow_tqdm=False)
    p.initialize_from_trained_model_folder(os.path.dirname(tr.output_folder), use_folds=(0,))
    assert p.network.infer_mode == "mean" and p.network.b.config["csunet_embed_dim"] == 16
    os.makedirs(stock_pred, exist_ok=True)
    p.predict_from_files_sequential(os.path.join(raw, "imagesTs"), str(stock_pred), False, True, None)
    cases = sorted(f for f in os.listdir(nnx_pred) if f.endswith(".nii.gz"))
    assert cases and cases == sorted(f for f in os.listdir(stock_pred) if f.endswith(".nii.gz"))
    for f in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(nnx_pred / f)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(stock_pred / f)))
        assert np.array_equal(a, b), f"stock prediction differs from nnx_predict on {f}"
