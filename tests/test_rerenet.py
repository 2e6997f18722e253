"""Tests of the ReReNet plugin (``nnx_plugins.rerenet``) and the coarse-mask simulator (``nnx_simulate_coarse``).

Spec ``shared/specs/000-li-thesis.md`` M1.8: loss against hand-computed values, stage weights, exactly K passes in
eval mode, the coarse channel aligned with image/target under augmentation, a tiny learning test (final stage
beats the coarse input), the simulator's Dice. Plus: options, 2d and 3d_fullres steps, nnx_predict with
``-inputs coarse=coarseTs`` and the stock predictor loading the checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import nnx_cmd, run_cli
from nnx_plugins.rerenet.loss import DiscrepancyAwareLoss, discrepancy_weights, pool_map, stage_weights
from nnx_plugins.rerenet.network import MissingMaskInputError, RecurrentRefiner, decode_mask, onehot_mask

DATASET_ID = 905
DATASET = "Dataset905_ReReNetBlobs"
PLANS = "nnxPlans_ReReNetTrainer_cpu"
FE = ".nii.gz"


# ------------------------------------------------------------------------------------------ stage weights (Eq. 3.6)
def test_stage_weights():
    assert stage_weights(5, norm="none") == [2, 4, 8, 16, 32]                        # k = 1..5 (Eq. 3.1)
    assert stage_weights(5, index_base=0, norm="none") == [1, 2, 4, 8, 16]
    assert stage_weights(3, sigma=3.0, index_base=0, norm="none") == [3, 3, 4]       # sigma matters for k = 0, 1
    w = stage_weights(5)                                                             # default: mean 1
    assert math.isclose(sum(w), 5) and all(math.isclose(a / b, 0.5) for a, b in zip(w, w[1:]))
    assert math.isclose(sum(stage_weights(5, norm="sum")), 1.0)
    assert stage_weights(1) == [1.0]                                                 # K = 1: an unweighted run
    with pytest.raises(ValueError):
        stage_weights(0)


# ----------------------------------------------------------------------------------------------- loss (Eq. 3.2-3.5)
def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _hand_loss(logits, target, prev, lam, alpha, smooth=1e-5, ignore=None, disc=None):
    """Eq. 3.2-3.5 in numpy: per-sample foreground Dice (mean over samples and foreground classes), CE weighted by
    lam*[prev != y] + 1 (or lam*disc + 1) and divided by the number of (non-ignored) voxels."""
    z = logits.double().numpy()
    y = target[:, 0].numpy().astype(int)
    disc = (prev.numpy().astype(int) != y) if disc is None else np.asarray(disc)
    valid = np.ones_like(y, bool) if ignore is None else y != ignore
    y0 = np.where(valid, y, 0)
    p = _np_softmax(z)
    n_cls = z.shape[1]
    dices = []
    for b in range(z.shape[0]):
        for c in range(1, n_cls):
            g = (y0[b] == c) & valid[b]
            pc = p[b, c] * valid[b]
            dices.append((2 * (pc * g).sum() + smooth) / (pc.sum() + g.sum() + smooth))
    dice_loss = 1 - np.mean(dices)
    logp = np.log(np.take_along_axis(p, y0[:, None], 1)[:, 0])
    w = lam * disc + 1
    ce = -(w * logp * valid).sum() / valid.sum()
    return dice_loss, ce, alpha * dice_loss + (1 - alpha) * ce


def test_discrepancy_weight_map():
    y = torch.tensor([[[[0, 1, 1], [0, 0, 1]]]])           # (B, 1, H, W)
    prev = torch.tensor([[[1, 1, 0], [0, 0, 1]]])          # (B, H, W): FP at (0,0), FN at (0,2)
    w = discrepancy_weights(prev, y, lam=10.0)
    assert w.tolist() == [[[[11.0, 1.0, 11.0], [1.0, 1.0, 1.0]]]]


def test_loss_matches_hand_computation_binary():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, generator=g)
    target = (torch.rand(2, 1, 3, 4, generator=g) > 0.5).long()
    prev = (torch.rand(2, 3, 4, generator=g) > 0.5).long()
    loss = DiscrepancyAwareLoss(alpha=0.8, lam=10.0)
    d_ref, ce_ref, total_ref = _hand_loss(logits, target, prev, 10.0, 0.8)
    d, ce = loss.parts(logits, target, (prev[:, None] != target).float())
    assert math.isclose(float(d), d_ref, rel_tol=1e-5) and math.isclose(float(ce), ce_ref, rel_tol=1e-5)
    assert math.isclose(float(loss(logits, target, prev)), total_ref, rel_tol=1e-5)          # alpha mixing
    assert math.isclose(float(loss(logits, target, prev, dice_only=True)), d_ref, rel_tol=1e-5)  # warm-up
    # binary softmax CE == the thesis' BCE on the foreground probability
    p1 = torch.softmax(logits, 1)[:, 1]
    bce = F.binary_cross_entropy(p1, target[:, 0].float())
    assert math.isclose(float(DiscrepancyAwareLoss(alpha=0.0, lam=0.0)(logits, target, prev)), float(bce), rel_tol=1e-5)
    # prev == y, or lambda = 0: the discrepancy term is plain CE
    ce_plain = float(F.cross_entropy(logits, target[:, 0]))
    assert math.isclose(float(loss.parts(logits, target, torch.zeros_like(target).float())[1]), ce_plain, rel_tol=1e-6)
    assert math.isclose(float(DiscrepancyAwareLoss(alpha=0.0, lam=0.0)(logits, target, prev)), ce_plain, rel_tol=1e-6)
    assert float(loss(logits, target, prev)) >= 0


def test_discrepant_voxel_gets_lambda_plus_one_times_the_gradient():
    # two voxels with identical logits and label; only the first was wrong in the previous stage
    logits = torch.tensor([[[[0.3, 0.3]], [[-0.2, -0.2]]]], requires_grad=True)   # (1, 2, 1, 2)
    target = torch.tensor([[[[1, 1]]]])
    prev = torch.tensor([[[0, 1]]])
    DiscrepancyAwareLoss(alpha=0.0, lam=10.0)(logits, target, prev).backward()
    gr = logits.grad[0, :, 0]
    assert torch.allclose(gr[:, 0], 11.0 * gr[:, 1])


def test_loss_multiclass_with_ignore_label():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    target = torch.randint(0, 3, (2, 1, 4, 5), generator=g)
    target[0, 0, 0, :3] = 3                                                         # ignore label (= max + 1)
    prev = torch.randint(0, 3, (2, 4, 5), generator=g)
    loss = DiscrepancyAwareLoss(alpha=0.8, lam=10.0, ignore_label=3)
    _, _, ref = _hand_loss(logits, target, prev, 10.0, 0.8, ignore=3)
    assert math.isclose(float(loss(logits, target, prev)), ref, rel_tol=1e-5)
    changed = logits.clone()
    changed[0, :, 0, :3] = 50 * torch.randn(3, 3, generator=g)                     # ignored voxels: no effect
    assert math.isclose(float(loss(changed, target, prev)), ref, rel_tol=1e-5)


def test_deep_supervision_pools_the_discrepancy_map():
    d = torch.zeros(1, 1, 4, 4)
    d[0, 0, 0, 0] = 1                                                               # one discrepant voxel
    assert pool_map(d, (2, 2), "max").tolist() == [[[[1.0, 0.0], [0.0, 0.0]]]]     # stays discrepant
    assert pool_map(d, (2, 2), "nearest").tolist() == [[[[0.0, 0.0], [0.0, 0.0]]]]  # nearest-exact drops it
    g = torch.Generator().manual_seed(2)
    logits = [torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 2, 2, generator=g)]
    target = [torch.randint(0, 2, (1, 1, 4, 4), generator=g), torch.randint(0, 2, (1, 1, 2, 2), generator=g)]
    prev = target[0][:, 0].clone()
    prev[0, 0, 0] = 1 - prev[0, 0, 0]                                               # discrepant at (0, 0) only
    loss = DiscrepancyAwareLoss(alpha=0.5, lam=10.0, ds_weights=[0.0, 1.0])       # only the low-res output
    _, _, ref = _hand_loss(logits[1], target[1], None, 10.0, 0.5, disc=[[[1, 0], [0, 0]]])
    assert math.isclose(float(loss(logits, target, prev)), ref, rel_tol=1e-5)
    nearest = DiscrepancyAwareLoss(alpha=0.5, lam=10.0, ds_weights=[0.0, 1.0], ds_pool="nearest")
    _, _, ref_nearest = _hand_loss(logits[1], target[1], None, 10.0, 0.5, disc=[[[0, 0], [0, 0]]])
    assert math.isclose(float(nearest(logits, target, prev)), ref_nearest, rel_tol=1e-5)


# ----------------------------------------------------------------------------------------------- network (Eq. 3.1)
def _toy(k=3, n_img=1, n_cls=2, ds=False):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    unet = PlainConvUNet(n_img + n_cls - 1, 3, (4, 8, 8), torch.nn.Conv2d, 3, ((1, 1), (2, 2), (2, 2)), 1, n_cls, 1,
                         True, torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=ds)
    return RecurrentRefiner(unet, n_img, n_cls, k)


def test_onehot_roundtrip():
    seg = torch.tensor([[[0, 1, 2], [2, 0, 1]]])
    oh = onehot_mask(seg, 3)
    assert oh.shape == (1, 2, 2, 3) and oh[0, 0].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert torch.equal(decode_mask(oh), seg)


def test_eval_mode_runs_exactly_k_stages_on_the_previous_hard_mask():
    torch.manual_seed(0)
    net = _toy(k=3, n_cls=3)
    calls = []
    net.unet.register_forward_hook(lambda m, inp, out: calls.append((inp[0].detach().clone(), out.detach().clone())))
    img = torch.randn(2, 1, 16, 16)
    coarse = torch.randint(0, 3, (2, 16, 16))
    x = torch.cat((img, onehot_mask(coarse, 3)), 1)
    net.train()
    assert net(x).shape == (2, 3, 16, 16) and len(calls) == 1                     # train mode: one stage
    calls.clear()
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert len(calls) == 3 and torch.equal(out, calls[-1][1])                       # K passes, last stage returned
    assert torch.equal(calls[0][0], x)                                              # stage 1 sees the coarse mask
    for k in (1, 2):                                                                # stage k+1: image + argmax of k
        assert torch.equal(calls[k][0][:, :1], img)
        assert torch.equal(calls[k][0][:, 1:], onehot_mask(calls[k - 1][1].argmax(1), 3))
    outs, masks = net.refine(x, keep_all=True)
    assert len(outs) == 3 and len(masks) == 4 and torch.equal(masks[0], coarse)
    assert all(m.dtype == torch.long and not m.requires_grad and int(m.max()) <= 2 for m in masks)
    calls.clear()
    net.set_num_stages(5)
    with torch.no_grad():
        net(x)
    assert len(calls) == 5 and int(net.state_dict()["num_stages"]) == 5             # K travels with the weights
    with pytest.raises(MissingMaskInputError, match="coarse"):
        net(img)                                                                    # image channels only


def test_eval_mode_with_deep_supervision_returns_the_last_stage_list():
    net = _toy(k=2, ds=True).eval()
    x = torch.cat((torch.randn(1, 1, 16, 16), onehot_mask(torch.zeros(1, 16, 16, dtype=torch.long), 2)), 1)
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, list) and out[0].shape == (1, 2, 16, 16)
    net.decoder.deep_supervision = False                                            # how nnU-Net toggles it
    with torch.no_grad():
        assert torch.is_tensor(net(x))


# ----------------------------------------------------------------------------------------------- options
def test_bad_options_fail_before_any_folder(monkeypatch, tmp_path):
    from nnx.errors import NNXError
    from nnx_plugins.rerenet import trainer as tr
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    cases = [(tr.ReReNetTrainer, "K=0"), (tr.ReReNetTrainer, "alpha=1.5"), (tr.ReReNetTrainer, "lambda_discr=-1"),
             (tr.ReReNetTrainer, "sigma=0"), (tr.ReReNetTrainer, "warmup_fraction=2"),
             (tr.ReReNetTrainer, "step_mode=joint"), (tr.ReReNetTrainer, "stage_index_base=2"),
             (tr.ReReNetTrainer_K1_noDiscr, "K=3"), (tr.ReReNetTrainer_noDiscr, "lambda_discr=5")]
    for cls, opts in cases:
        monkeypatch.setenv("NNX_TRAINER_OPTS", opts)
        with pytest.raises(NNXError) as e:
            cls({"continue_training": False}, "2d", 0, {}, torch.device("cpu"))
        assert "\n" not in str(e.value), opts
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- coarse-mask simulator
def write_blobs(raw: str, did: int = DATASET_ID, n_train: int = 10, n_test: int = 3, seed: int = 0,
                shape=(12, 48, 48), name: str = "ReReNetBlobs") -> str:
    """A small binary dataset (nnU-Net raw format, no coarse masks): 1-2 bright ellipsoids per volume."""
    import SimpleITK as sitk
    full = f"Dataset{did:03d}_{name}"
    ds = os.path.join(raw, full)
    for f in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(ds, f), exist_ok=True)
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    for i in range(n_train + n_test):
        lab = np.zeros(shape, np.uint8)
        for _ in range(rng.integers(1, 3)):
            c = rng.uniform([3, 12, 12], [shape[0] - 3, shape[1] - 12, shape[2] - 12])
            r = rng.uniform([1.5, 6, 6], [3, 12, 12])
            lab[(((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2) < 1] = 1
        img = (100 + rng.normal(0, 3, shape) + 30 * lab).astype(np.float32)
        split = "Tr" if i < n_train else "Ts"
        for arr, f in ((img, f"images{split}/case_{i:03d}_0000{FE}"), (lab, f"labels{split}/case_{i:03d}{FE}")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.0, 1.0, 3.0))
            sitk.WriteImage(im, os.path.join(ds, f))
    with open(os.path.join(ds, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "lesion": 1}, "numTraining": n_train,
                   "file_ending": FE, "overwrite_image_reader_writer": "SimpleITKIO", "name": name}, f)
    return ds


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read(path):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def dice(a, b) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture
def sim_raw(tmp_path, monkeypatch):
    """An own nnUNet_raw with a small dataset without coarse masks (ID 905, independent of the session's)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    return write_blobs(str(tmp_path / "raw"), n_train=6, n_test=2)


def test_simulator_hits_the_target_and_passes_nnx_checks(sim_raw, capsys):
    from nnx_dataset_conversion.coarse_masks import main
    from nnx import checks
    assert main(["-d", str(DATASET_ID), "--dice", "0.6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "coarseTr: 6 simulated" in out and "coarseTs: 2 simulated" in out and "mean Dice" in out
    d_tr = [dice(read(os.path.join(sim_raw, "coarseTr", f)), read(os.path.join(sim_raw, "labelsTr", f)))
            for f in sorted(os.listdir(os.path.join(sim_raw, "labelsTr")))]
    d_ts = [dice(read(os.path.join(sim_raw, "coarseTs", f)), read(os.path.join(sim_raw, "labelsTs", f)))
            for f in sorted(os.listdir(os.path.join(sim_raw, "labelsTs")))]
    assert abs(np.mean(d_tr) - 0.6) < 0.03 and abs(np.mean(d_ts) - 0.6) < 0.03, (d_tr, d_ts)
    assert all(abs(d - 0.6) < 0.1 for d in d_tr + d_ts)
    dj = load_json(os.path.join(sim_raw, "dataset.json"))
    assert dj["nnx"]["coarse"] == {"train": "coarseTr", "test": "coarseTs"}
    assert set(dj["nnx"]["tiers"].values()) == {"expert"} and len(dj["nnx"]["tiers"]) == 6
    summary = checks.check_raw_dataset(sim_raw)                                     # what nnx_plan checks first
    assert summary["nnx"]["entries"]["coarse"] == 6 and summary["nnx"]["test_inputs"]["coarse"] == 2
    assert not [f for f in os.listdir(sim_raw) if f.startswith(".tmp")]             # no temporary leftovers
    # deterministic per seed; --overwrite needed to replace
    first = read(os.path.join(sim_raw, "coarseTr", "case_000" + FE))
    assert main(["-d", str(DATASET_ID), "--dice", "0.6", "--seed", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["-d", str(DATASET_ID), "--dice", "0.6", "--seed", "1", "--overwrite"]) == 0
    assert np.array_equal(read(os.path.join(sim_raw, "coarseTr", "case_000" + FE)), first)


def test_simulator_keeps_an_existing_nnx_block_and_copies_coarse_tier_labels(sim_raw, capsys):
    from nnx import checks
    from nnx_dataset_conversion.coarse_masks import main
    path = os.path.join(sim_raw, "dataset.json")
    dj = load_json(path)
    tiers = {f"case_{i:03d}": "expert" for i in range(6)}
    tiers["case_001"] = "coarse"                                  # its labelsTr file is a coarse mask
    dj["nnx"] = {"format_version": 1, "tiers": tiers}
    with open(path, "w") as f:
        json.dump(dj, f)
    assert main(["-d", str(DATASET_ID), "--dice", "0.75"]) == 0
    assert "5 simulated mask(s)" in capsys.readouterr().out
    with open(os.path.join(sim_raw, "coarseTr", "case_001" + FE), "rb") as a, \
            open(os.path.join(sim_raw, "labelsTr", "case_001" + FE), "rb") as b:
        assert a.read() == b.read()
    dj = load_json(path)
    assert dj["nnx"]["tiers"] == tiers and dj["nnx"]["coarse"] == {"train": "coarseTr", "test": "coarseTs"}
    assert checks.check_raw_dataset(sim_raw)["nnx"]["tiers"]["coarse"] == 1


def test_simulator_bad_input_one_line_errors(sim_raw, capsys):
    from nnx_dataset_conversion.coarse_masks import main

    def err(args):
        rc = main(args)
        e = capsys.readouterr().err
        assert rc == 2 and len(e.strip().splitlines()) == 1 and "Traceback" not in e, e
        return e

    assert "--dice" in err(["-d", str(DATASET_ID), "--dice", "1.5"])
    assert "not found" in err(["-d", "904", "--dice", "0.7"])
    os.remove(os.path.join(sim_raw, "labelsTs", "case_007" + FE))                  # a test case without labelsTs
    assert "case_007" in err(["-d", str(DATASET_ID), "--dice", "0.7"])
    assert not os.path.exists(os.path.join(sim_raw, "coarseTr"))                    # nothing written


# ----------------------------------------------------------------------------------------------- trainer on a dataset
@pytest.fixture(scope="module")
def blobs(nnunet_env):
    """Dataset 905 (binary blobs) with simulated coarse masks (Dice 0.7), planned for CPU (2d + 3d_fullres)."""
    from nnx_dataset_conversion.coarse_masks import main as simulate
    from nnx.cli.plan import main as plan
    ds = os.path.join(nnunet_env["nnUNet_raw"], DATASET)
    if os.path.isdir(ds):
        shutil.rmtree(ds)
    write_blobs(nnunet_env["nnUNet_raw"])
    assert simulate(["-d", str(DATASET_ID), "--dice", "0.7"]) == 0
    mp = pytest.MonkeyPatch()
    mp.delenv("nnUNet_n_proc_DA", raising=False)
    assert plan(["-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-tr", "ReReNetTrainer", "-device", "cpu",
                 "-np", "1"]) == 0                                                 # nnx_plan accepts the dataset
    mp.setenv("nnUNet_n_proc_DA", "0")
    yield ds
    mp.undo()


def _trainer(cfg, opts="", cls_name="ReReNetTrainer", continue_training=False, fold=1):
    """A trainer instance (fold 1 by default: fold 0 of 2d is the one nnx_train trains in ``trained``)."""
    from nnx.registry import load_trainer
    os.environ["NNX_TRAINER_OPTS"] = opts
    try:
        pp = os.path.join(os.environ["nnUNet_preprocessed"], DATASET)
        plans = load_json(os.path.join(pp, PLANS + ".json"))
        plans["continue_training"] = continue_training   # what get_trainer_from_args adds
        return load_trainer(cls_name)(plans=plans, configuration=cfg, fold=fold,
                                      dataset_json=load_json(os.path.join(pp, "dataset.json")),
                                      device=torch.device("cpu"))
    finally:
        os.environ.pop("NNX_TRAINER_OPTS", None)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cfg", ["2d", "3d_fullres"])
def test_coarse_channel_stays_aligned_with_the_target_under_augmentation(blobs, cfg, monkeypatch, one_thread):
    """Coarse mask := the expert label; after the trainer's training transforms (rotation and scaling forced on)
    the coarse channels equal the one-hot target voxel for voxel."""
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
    from nnx import loading
    from nnx.extras import open_array
    t = _trainer(cfg, "K=1")
    t.initialize()
    orig = loading.ExtrasSource.load

    def seg_as_coarse(self, case):
        out = orig(self, case)
        out["coarse"] = open_array(os.path.join(t.preprocessed_dataset_folder, case + "_seg"))
        return out

    monkeypatch.setattr(loading.ExtrasSource, "load", seg_as_coarse)
    dl_tr, dl_val = t.get_dataloaders()
    spatial = [s for s in dl_tr.data_loader.transforms.transforms if isinstance(s, SpatialTransform)]
    assert len(spatial) == 1
    spatial[0].p_rotation = spatial[0].p_scaling = 1.0
    for dl in (dl_tr, dl_val):
        for _ in range(3):
            b = next(dl)
            tgt = b["target"][0] if isinstance(b["target"], list) else b["target"]
            assert b["data"].shape[1] == 2 and torch.equal(b["data"][:, 1:], (tgt == 1).float())
            assert torch.equal(b["coarse"].long(), tgt.long())


@pytest.mark.parametrize("mode", ["stagewise", "summed"])
def test_3d_fullres_train_and_validation_steps(blobs, mode, one_thread):
    from nnx_plugins.rerenet.network import RecurrentRefiner, unwrap
    t = _trainer("3d_fullres", f"K=2 step_mode={mode} iters_per_epoch=1")
    t.initialize()
    net = unwrap(t.network)
    assert isinstance(net, RecurrentRefiner) and net.K == 2 and net.num_input_channels == 2
    dl_tr, dl_val = t.get_dataloaders()
    steps, passes = [], []
    step = t.optimizer.step
    t.optimizer.step = lambda *a, **kw: (steps.append(1), step(*a, **kw))[1]
    net.unet.register_forward_hook(lambda *a: passes.append(1))
    before = [p.detach().clone() for p in net.parameters()]
    t.network.train()
    out = t.train_step(next(dl_tr))
    assert len(passes) == 2 and len(steps) == (2 if mode == "stagewise" else 1)
    assert out["stage_losses"].shape == (2,) and np.isfinite(out["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    t.network.eval()
    with torch.no_grad():
        v = t.validation_step(next(dl_val))
    assert v["stage_counts"].shape == (3, 3, 1) and v["tp_hard"].shape == (1,)
    assert np.array_equal(v["stage_counts"][-1, 0], v["tp_hard"])


def test_continue_training_keeps_k_and_the_stage_logs(blobs, one_thread):
    from nnunetv2.run.run_training import maybe_load_checkpoint
    from nnx_plugins.rerenet.network import unwrap
    a = _trainer("2d", "epochs=1 iters_per_epoch=1 val_iters=1 K=2 save_every=1", fold=2)
    a.run_training()
    b = _trainer("2d", "epochs=2 iters_per_epoch=1 val_iters=1 K=2 save_every=1", continue_training=True, fold=2)
    maybe_load_checkpoint(b, True, False)
    assert b.current_epoch == 1 and unwrap(b.network).K == 2
    b.run_training()
    log = b.logger.local_logger.my_fantastic_logging
    assert [len(log[k]) for k in ("rerenet_val_dice_stages", "rerenet_train_loss_stages", "rerenet_warmup")] == [2] * 3
    assert all(len(v) == 3 for v in log["rerenet_val_dice_stages"])                # input + K = 2 stages
    assert all(len(v) == 2 for v in log["rerenet_train_loss_stages"])


def test_network_builds_with_and_without_counted_mask_channels(blobs):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx_plugins.rerenet.trainer import ReReNetTrainer
    plans = load_json(os.path.join(os.environ["nnUNet_preprocessed"], DATASET, PLANS + ".json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration("2d")
    a = ReReNetTrainer.build_network_architecture(pm, cm, 2, 2, False)  # nnx (mask channels counted)
    b = ReReNetTrainer.build_network_architecture(pm, cm, 1, 2, False)  # stock predictor (images only)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="channel"):
        ReReNetTrainer.build_network_architecture(pm, cm, 3, 2, False)


# ----------------------------------------------------------------------------------------------- learning + prediction
# nnx's -device cpu honours OMP_NUM_THREADS: on a 2-core machine shared with other processes, two OpenMP threads
# stall for minutes per epoch (measured: 35 s idle, 240-300 s under load), one thread does not
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def trained(blobs):
    """ReReNet (K=5, stagewise) trained in 2d on CPU: 8 epochs x 10 iterations through nnx_train (nnU-Net's
    run_training incl. final validation)."""
    import time
    t0 = time.time()
    # seeded (nnU-Net does not seed): unseeded, 80 steps from some initialisations stayed below the coarse input
    # (one CI run: Dice 0.44 vs 0.70; seeds 0-3 reach 0.99); with one thread and no DA workers it is deterministic
    r = run_cli([sys.executable, "-m", "nnx.bench.train_run", "0", str(DATASET_ID), "2d", "0", "-tr", "ReReNetTrainer",
                 "-p", PLANS, "-device", "cpu", "--epochs", "8", "--iters-per-epoch", "10", "--val-iters", "2"],
                env={"nnUNet_n_proc_DA": "0", **ONE_THREAD})
    assert r.returncode == 0, r.stderr[-3000:]
    out = os.path.join(os.environ["nnUNet_results"], DATASET, f"ReReNetTrainer__{PLANS}__2d")
    return {"model": out, "seconds": time.time() - t0}


@pytest.mark.slow
def test_learns_to_beat_the_coarse_input_and_predicts_with_coarse_inputs(blobs, trained, tmp_path):
    fold = os.path.join(trained["model"], "fold_0")
    log = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert int(log["network_weights"]["num_stages"]) == 5 and log["nnx_inputs"] == [{"name": "coarse", "values": [1]}]
    stages = log["logging"]["rerenet_val_dice_stages"]
    assert len(stages) == 8 and all(len(s) == 6 for s in stages)                   # input + 5 stages per epoch
    assert log["logging"]["rerenet_warmup"] == [1, 1, 0, 0, 0, 0, 0, 0]              # 20 % of 8 epochs
    cfg = load_json(os.path.join(fold, "nnx_config.json"))
    assert cfg["options"]["K"] == 5 and cfg["options"]["step_mode"] == "stagewise"

    pred = tmp_path / "pred"
    r = run_cli(nnx_cmd("predict", "-i", os.path.join(blobs, "imagesTs"), "-o", str(pred), "-d", str(DATASET_ID),
                        "-c", "2d", "-p", PLANS, "-tr", "ReReNetTrainer", "-f", "0", "-device", "cpu", "--quiet",
                        "-inputs", f"coarse={blobs}/coarseTs"), env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = sorted(os.listdir(os.path.join(blobs, "labelsTs")))
    assert sorted(f for f in os.listdir(pred) if f.endswith(FE)) == cases
    d_pred = [dice(read(pred / c), read(os.path.join(blobs, "labelsTs", c))) for c in cases]
    d_coarse = [dice(read(os.path.join(blobs, "coarseTs", c)), read(os.path.join(blobs, "labelsTs", c)))
                for c in cases]
    print(f"ReReNet test Dice {np.mean(d_pred):.3f} vs coarse input {np.mean(d_coarse):.3f} "
          f"(training {trained['seconds']:.0f} s)")
    assert np.mean(d_pred) > np.mean(d_coarse) + 0.05, (d_pred, d_coarse)


@pytest.mark.slow
def test_nnx_predict_without_coarse_input_is_a_one_line_error(blobs, trained, tmp_path, capsys):
    from nnx.cli.predict import main
    rc = main(["-i", os.path.join(blobs, "imagesTs"), "-o", str(tmp_path / "p"), "-d", str(DATASET_ID), "-c", "2d",
               "-p", PLANS, "-tr", "ReReNetTrainer", "-f", "0", "-device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "-inputs coarse=FOLDER" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_stock_predictor_loads_the_checkpoint(blobs, trained, tmp_path, monkeypatch, one_thread):
    """nnU-Net's own predictor (as nnUNetv2_predict, trainer found through nnUNet_extTrainer) builds the K-stage
    network from the plans, loads the weights strictly and predicts with -prev_stage_predictions = coarse masks."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnx.ext_path import SHIM_DIR
    from nnx_plugins.rerenet.network import RecurrentRefiner
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(trained["model"], use_folds=(0,))
    assert isinstance(pred.network, RecurrentRefiner) and pred.network.K == 5
    out = tmp_path / "stock"
    os.makedirs(out)
    pred.predict_from_files_sequential(os.path.join(blobs, "imagesTs"), str(out), False, True,
                                       folder_with_segs_from_prev_stage=os.path.join(blobs, "coarseTs"))
    cases = sorted(os.listdir(os.path.join(blobs, "labelsTs")))
    d = [dice(read(out / c), read(os.path.join(blobs, "labelsTs", c))) for c in cases]
    d_coarse = [dice(read(os.path.join(blobs, "coarseTs", c)), read(os.path.join(blobs, "labelsTs", c)))
                for c in cases]
    assert np.mean(d) > np.mean(d_coarse) + 0.05
    os.makedirs(tmp_path / "none")
    with pytest.raises(MissingMaskInputError, match="prev_stage_predictions"):
        pred.predict_from_files_sequential(os.path.join(blobs, "imagesTs"), str(tmp_path / "none"), False, True)


def test_nnx_train_option_error_is_one_line(blobs, capsys):
    from nnx.cli.train import main
    rc = main([str(DATASET_ID), "2d", "0", "-tr", "ReReNetTrainer", "-p", PLANS, "-device", "cpu", "--opt", "K=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "'K' must be >= 1" in err and len(err.strip().splitlines()) == 1, err
