"""Tests of the anatomy-injection plugin (``nnx_plugins.anatomy``): ANA in., GRASP, the multi-task baseline.

Spec ``shared/specs/003-jaus-thesis.md`` M5 §8: align-block shapes, delta = 0.5 at start (and the gated residual),
the frozen anatomy encoder unchanged after a training step, the output identical to the plain network before the
switch epoch and in eval mode, label IDs surviving preprocessing (the real TotalSegmentator organ map). Plus: the
scaled / grouped encodings end to end (batch = nnx_predict), the multi-task loss against hand-computed values, a
GRASP checkpoint loading into nnU-Net's own network and predicting exactly as nnx_predict, one-line errors for a bad
organ-model folder, and the bench mechanism the ``anatomy`` suite needs (an arm on its own dataset, ``@arm:``).
"""
from __future__ import annotations

import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnx.errors import NNXError
from nnx.extras import input_label_values, onehot
from nnx_plugins.anatomy.encoding import channel_definitions, class_lut, parse_groups
from nnx_plugins.anatomy.fusion import AlignBlock, FusionBlock, GRASPFusion
from nnx_plugins.anatomy.multitask import MagnitudeNormalizedSum
from nnx_plugins.anatomy.volumes import fp_fn_volumes

PLANS = "nnUNetPlans"
ORGANS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3, "bladder": 4, "spine": 5}
TS_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "totalsegmentator_example")


# ----------------------------------------------------------------------------------------------- fusion (M5 §8)
def test_align_block_shapes():
    torch.manual_seed(0)
    a = AlignBlock(16, 32)
    out = a(torch.randn(1, 16, 5, 6, 7), (4, 4, 4))
    assert out.shape == (1, 32, 4, 4, 4)
    same = a(torch.randn(2, 16, 4, 4, 4), (4, 4, 4))          # equal shapes: the 1x1x1 conv only
    assert same.shape == (2, 32, 4, 4, 4)


def test_fusion_block_starts_at_delta_half_and_gates_the_residual():
    torch.manual_seed(0)
    b = FusionBlock(32, 16, heads=8)
    assert float(b.w.detach()) == 0.0 and float(b.delta.detach()) == 0.5
    z_path, z_ana = torch.randn(2, 32, 4, 4, 4), torch.randn(2, 16, 5, 6, 7)
    out = b(z_path, z_ana)
    assert out.shape == z_path.shape
    o = b.attend(z_path, b.align(z_ana, (4, 4, 4)))
    assert torch.allclose(out, 0.5 * o + 0.5 * z_path, atol=1e-6)
    b.attend = lambda zp, a: zp                                 # identity stub: O = Z_path -> output = Z_path
    assert torch.allclose(b(z_path, z_ana), z_path, atol=1e-6)
    with torch.no_grad():
        b.w.fill_(2.0)
    assert torch.isclose(b.delta, torch.sigmoid(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="heads"):
        FusionBlock(30, 16, heads=8)


def test_grasp_fusion_touches_only_the_deepest_stages():
    torch.manual_seed(0)
    f = GRASPFusion([8, 16, 32], [8, 16, 32], n_stages=2, heads=8)
    skips = [torch.randn(1, 8, 8, 8, 8), torch.randn(1, 16, 4, 4, 4), torch.randn(1, 32, 2, 2, 2)]
    ana = [torch.randn_like(s) for s in skips]
    out = f(skips, ana)
    assert out[0] is skips[0] and not torch.equal(out[1], skips[1]) and not torch.equal(out[2], skips[2])
    assert [o.shape for o in out] == [s.shape for s in skips]


def test_cost_estimate_of_the_bottleneck_attention():
    from nnx_plugins.anatomy.cost import grasp_extra_bytes, stage_shapes
    strides = [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert stage_shapes([128] * 3, strides)[-2:] == [(8, 8, 8), (4, 4, 4)]   # 512 and 64 tokens
    est = grasp_extra_bytes([128] * 3, strides, [32, 64, 128, 256, 320, 320], batch_size=1, heads=8)
    assert est["attention"] == 4 * 8 * (512 ** 2 + 64 ** 2) * 4                # 2 attentions x (logits + probs)
    assert est["attention"] < 0.04e9                                           # ~34 MB: small next to a step


# ----------------------------------------------------------------------------------------------- encodings
def test_scaled_and_grouped_encodings_give_the_promised_values():
    seg = np.array([[[0, 1, 2], [3, 4, 5]]], dtype=np.int16)          # (1, 2, 3)
    groups = parse_groups("", ORGANS)
    assert groups == [[1], [2], [3], [4], [5]]
    scaled = onehot(seg, channel_definitions(groups, "scaled"))       # id / C_ana (C_ana = 5)
    assert scaled.shape == (1, 2, 3) and np.allclose(scaled[0], seg[0] / 5.0)
    g = parse_groups("liver+kidney/spleen", ORGANS)                   # bladder, spine dropped
    assert g == [[1, 3], [2]] and class_lut(g) == {1: 1, 3: 1, 2: 2}
    gs = onehot(seg, channel_definitions(g, "scaled", scale_by_value=False))
    assert np.allclose(gs[0], [[0, 0.5, 1.0], [0.5, 0, 0]])          # group index / number of groups
    oh = channel_definitions(g, "onehot")
    assert oh == [[[1, 1.0], [3, 1.0]], 2] and input_label_values(oh) == [1, 2, 3]
    assert np.array_equal(onehot(seg, oh), [[[0, 1, 0], [1, 0, 0]], [[0, 0, 1], [0, 0, 0]]])
    assert np.array_equal(onehot(seg, [1, 2]), [(seg[0] == 1), (seg[0] == 2)])  # plain one-hot unchanged
    assert parse_groups("*/kidney/liver", ORGANS) == [[2], [4], [5], [3], [1]]  # the rest first, lesion organs last
    assert parse_groups("liver+kidney/*", ORGANS) == [[1, 3], [2], [4], [5]]
    top = dict(channel_definitions(parse_groups("*/kidney/liver", ORGANS), "scaled", scale_by_value=False)[0])
    assert top[1] == 1.0 and top[3] == pytest.approx(0.8) and max(top[v] for v in (2, 4, 5)) == pytest.approx(0.6)
    for bad, msg in (("liver+liver", "groups 1 and 1"), ("liver/", "empty"), ("lung", "not an anatomy label"),
                     ("background", "not a foreground"), ("*/liver/*", "may appear once")):
        with pytest.raises(NNXError, match=msg):
            parse_groups(bad, ORGANS)


def test_scaled_offset_moves_every_organ_code_away_from_background():
    seg = np.array([[[0, 1, 2], [3, 4, 5]]], dtype=np.int16)
    off = onehot(seg, channel_definitions(parse_groups("", ORGANS), "scaled", offset=0.5))
    assert np.allclose(off[0], [[0, 0.6, 0.7], [0.8, 0.9, 1.0]])     # 0.5 + 0.5 * id / 5, background 0
    g = parse_groups("liver+kidney/spleen", ORGANS)
    og = onehot(seg, channel_definitions(g, "scaled", scale_by_value=False, offset=0.5))
    assert np.allclose(og[0], [[0, 0.75, 1.0], [0.75, 0, 0]])        # 0.5 + 0.5 * group / 2
    assert channel_definitions(g, "scaled", offset=0.0) == channel_definitions(g, "scaled")  # 0 = thesis' id / C
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            channel_definitions(g, "scaled", offset=bad)
    with pytest.raises(ValueError, match="scaled encoding only"):
        channel_definitions(g, "onehot", offset=0.5)


# ----------------------------------------------------------------------------------------------- multi-task loss
def test_multitask_loss_matches_hand_computed_running_normalisation():
    m = MagnitudeNormalizedSum(alpha=0.8, norm="running", momentum=0.9)
    seq = [(-0.5, 2.0), (0.3, 1.0), (-0.1, 4.0)]
    mp = ma = None
    for lp, la in seq:
        p, a = torch.tensor(lp, requires_grad=True), torch.tensor(la, requires_grad=True)
        mp = abs(lp) if mp is None else 0.9 * mp + 0.1 * abs(lp)     # m_1 = |L_1|, then EMA of |L|
        ma = abs(la) if ma is None else 0.9 * ma + 0.1 * abs(la)
        out = m(p, a)
        assert np.isclose(float(out["loss"].detach()), 0.8 * lp / mp + 0.2 * la / ma, rtol=1e-6)
        out["loss"].backward()
        assert np.isclose(float(p.grad), 0.8 / mp, rtol=1e-6) and np.isclose(float(a.grad), 0.2 / ma, rtol=1e-6)
    assert np.isclose(float(m.m_path), 0.9 * (0.9 * 0.5 + 0.1 * 0.3) + 0.1 * 0.1)
    assert int(m.steps) == 3
    b = MagnitudeNormalizedSum(alpha=0.8, norm="batch")
    assert np.isclose(float(b(torch.tensor(-0.5), torch.tensor(2.0))["loss"]), 0.8 * -1 + 0.2 * 1)
    n = MagnitudeNormalizedSum(alpha=0.7, norm="none")
    assert np.isclose(float(n(torch.tensor(-0.5), torch.tensor(2.0))["loss"]), 0.7 * -0.5 + 0.3 * 2.0)
    m.eval()                                                            # validation does not move the means
    before = float(m.m_path)
    m(torch.tensor(9.0), torch.tensor(9.0))
    assert float(m.m_path) == before


def test_fp_fn_volumes_follow_the_autopet_definitions():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:3, 1:3, 1:3] = 1        # lesion A (8 voxels), found
    ref[6:8, 6:8, 6:8] = 1        # lesion B (8 voxels), missed -> FN
    pred[1:3, 1:3, 1:4] = 1       # overlaps A: not a false positive even where larger
    pred[6:9, 0:2, 0:2] = 1       # 12 voxels, no overlap -> FP, outside the organ
    pred[0, 8:10, 8:10] = 1       # 4 voxels, no overlap -> FP inside the organ
    organs = np.zeros_like(ref)
    organs[0:2, 7:10, 7:10] = 1
    v = fp_fn_volumes(pred, ref, (2.0, 1.0, 1.0), organs)   # 2 mm^3 per voxel = 0.002 mL
    assert v["FPV"] == pytest.approx(16 * 0.002) and v["FNV"] == pytest.approx(8 * 0.002)
    assert v["FPV_outside"] == pytest.approx(12 * 0.002)
    assert (v["FP_components"], v["FN_components"]) == (2, 1)
    mimics = np.zeros_like(ref)
    mimics[8, 0, 0] = 1           # one voxel of the 12-voxel FP component: the whole component counts
    mimics[4, 8:10, 0:2] = 1      # a mimic the prediction leaves alone
    v = fp_fn_volumes(pred, ref, (2.0, 1.0, 1.0), None, mimics)
    assert v["FPV_mimics"] == pytest.approx(12 * 0.002) and (v["mimics"], v["mimics_hit"]) == (2, 1)
    assert "mimics_outside" not in v                                    # needs the organ map
    assert "FPV_mimics" not in fp_fn_volumes(pred, ref, (2.0, 1.0, 1.0), organs)
    mimics[0, 9, 9] = 1           # a mimic inside the organ, hit by the 4-voxel FP
    mimics[1, 7, 6:9] = 1         # 2 of its 3 voxels in the organ: inside, not hit
    v = fp_fn_volumes(pred, ref, (2.0, 1.0, 1.0), organs, mimics)
    assert (v["mimics"], v["mimics_hit"], v["mimics_outside"], v["mimics_outside_hit"]) == (4, 2, 2, 1)
    assert v["FPV_mimics"] == pytest.approx(16 * 0.002)
    assert v["FPV_mimics_outside"] == pytest.approx(12 * 0.002)


def test_folder_mimic_hit_rates_pool_the_mimics_of_all_cases(tmp_path):
    import SimpleITK as sitk
    from nnx_plugins.anatomy.volumes import folder_volumes
    folders = {k: tmp_path / k for k in ("pred", "ref", "organs", "mimics")}
    for f in folders.values():
        f.mkdir()
    for case, n_out, n_hit_out, n_in in (("a", 3, 1, 0), ("b", 1, 1, 2)):   # outside mimics (hit), inside mimics
        arrs = {k: np.zeros((4, 12, 12), np.uint8) for k in folders}
        arrs["organs"][:, :, 6:] = 1
        for i in range(n_out):
            arrs["mimics"][1, 2 * i, 0] = 1
            arrs["pred"][1, 2 * i, 0] = i < n_hit_out
        for i in range(n_in):
            arrs["mimics"][1, 2 * i, 8] = 1                             # inside, hit
            arrs["pred"][1, 2 * i, 8] = 1
        for k, a in arrs.items():
            img = sitk.GetImageFromArray(a)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(folders[k] / f"{case}.nii.gz"))
    m = folder_volumes(str(folders["pred"]), str(folders["ref"]), str(folders["organs"]),
                       mimic_folder=str(folders["mimics"]))["mean"]
    assert m["mimic_hit_rate"] == pytest.approx(4 / 6)                  # (1 + 0) + (1 + 2) of (3 + 0) + (1 + 2)
    assert m["mimic_outside_hit_rate"] == pytest.approx(2 / 4)          # pooled, not the mean of 1/3 and 1/1
    assert "mimics_outside" not in m and "mimics" not in m


def test_grasp_inference_time_is_compared_with_the_anatomy_input_arm_of_the_same_encoding():
    from nnx_plugins.anatomy.volumes import grasp_and_its_inference_twin
    arms = [{"name": "Organs", "trainer": "nnUNetTrainer", "dataset": {"phantom": "small"}},
            {"name": "ANA in.", "trainer": "AnatomyInputTrainer", "options": {}},
            {"name": "GRASP", "trainer": "GRASPTrainer", "options": {"anatomy_model": "@arm:Organs"}},
            {"name": "ANA in. onehot", "trainer": "AnatomyInputTrainer", "options": {"anatomy_encoding": "onehot"}}]
    assert grasp_and_its_inference_twin(arms) == ("GRASP", "ANA in.")
    arms[1]["options"]["anatomy_encoding"] = "scaled"                   # the default, spelled out
    assert grasp_and_its_inference_twin(arms) == ("GRASP", "ANA in.")
    arms[2]["options"]["anatomy_encoding"] = "onehot"
    assert grasp_and_its_inference_twin(arms) == ("GRASP", "ANA in. onehot")
    arms[2]["options"]["anatomy_groups"] = "liver+kidney"
    assert grasp_and_its_inference_twin(arms) == ("GRASP", None)
    assert grasp_and_its_inference_twin(arms[:2]) == (None, None)


# ----------------------------------------------------------------------------------------------- bench mechanism
def test_suite_arm_on_its_own_dataset_and_arm_references():
    from nnx.bench.runner import Bench
    from nnx.bench.suite import load_suite
    from nnx_plugins.anatomy.bench import SUITE
    s = load_suite(copy.deepcopy(SUITE))
    organs, grasp = s.arm("Organs"), s.arm("GRASP")
    assert not organs.evaluated and [a.name for a in s.evaluated_arms] == ["nnU-Net", "ANA in.", "MultiTask",
                                                                           "GRASP", "ANA in. onehot",
                                                                           "GRASP onehot", "GRASP fused-inf",
                                                                           "GRASP onehot fused-inf"]
    assert organs.dataset["phantom_options"]["task"] == "organs" and s.data_key(organs) != s.data_key()
    assert grasp.options["anatomy_model"] == "@arm:Organs" and grasp.measure_options == {"fusion_start_epoch": "0"}
    k = s.run_key(grasp, 0)
    changed = copy.deepcopy(SUITE)
    changed["arms"][0]["options"] = {"epochs": 7}                   # only the organ model's training changes
    s2 = load_suite(changed)
    assert s2.run_key(s2.arm("GRASP"), 0) != k                     # the organ model's run is part of GRASP's key
    assert s2.run_key(s2.arm("nnU-Net"), 0) == s.run_key(s.arm("nnU-Net"), 0)
    b = Bench(s, "/tmp/out", "cpu", progress=lambda *_: None)
    b.dataset, b.plans = "Dataset877_PhantomSmall", "nnUNetPlans"
    b.arm_data["Organs"] = ("Dataset878_PhantomSmall", "nnUNetPlans")
    opts = b.resolved_options(grasp, 2)
    assert opts["anatomy_model"] == "/tmp/out/runs/Organs/seed2/results/Dataset878_PhantomSmall/" \
                                    f"nnUNetTrainer__nnUNetPlans__{s.configuration}"
    fused = s.arm("GRASP fused-inf")                                 # GRASP's training, predicted with fusion on
    assert fused.predict_options == {"inference_fusion": "on"} and s.training_arm(fused) is grasp
    assert s.training_arm(s.arm("GRASP onehot fused-inf")) is s.arm("GRASP onehot")
    assert s.training_arm(grasp) is grasp and s.predict_key(fused, 0) != s.predict_key(grasp, 0)
    assert b.model_dir(fused, 1) == b.model_dir(grasp, 1) != b.model_dir(s.arm("GRASP onehot"), 1)
    assert b.run_dir(fused, 1) != b.run_dir(grasp, 1)                # its own predictions and evaluation
    trained = []
    b.train = lambda arm, seed, status, _t=b.train: (trained.append(arm.name) or {"train_s": 1.0}) \
        if arm is grasp else _t(arm, seed, status)
    assert b.train(fused, 0, None)["shared_with"] == "GRASP" and trained == ["GRASP"]
    bad = copy.deepcopy(SUITE)
    bad["arms"][-1]["predict_options"] = {"heads": 4}               # shapes the weights: not a prediction option
    with pytest.raises(NNXError, match="cannot be changed at prediction time"):
        load_suite(bad)
    bad = copy.deepcopy(SUITE)
    bad["arms"] = sorted(bad["arms"], key=lambda a: a["name"] != "GRASP")  # GRASP before Organs
    with pytest.raises(NNXError, match="earlier arm"):
        load_suite(bad)
    bad = copy.deepcopy(SUITE)
    bad["arms"][0]["dataset"]["phantom_id"] = SUITE["dataset"]["phantom_id"]
    with pytest.raises(NNXError, match="phantom_id"):
        load_suite(bad)


def test_order_suite_puts_the_lesion_organs_where_its_arm_names_say_and_shares_the_anatomy_runs():
    from nnx.bench.suite import load_suite
    from nnx.synth.dataset import anatomy_labels
    from nnx.synth.phantom import LESION_ORGANS
    from nnx_plugins.anatomy.bench import ORDER_SUITE, SUITE
    labels = anatomy_labels()
    lesion = {labels[o] for o in LESION_ORGANS}

    def codes(arm):
        o = arm.options
        groups = parse_groups(o.get("anatomy_groups", ""), labels)
        (defs,) = channel_definitions(groups, "scaled", scale_by_value=not o.get("anatomy_groups"),
                                      offset=float(o.get("anatomy_offset", 0)))
        return dict(defs)

    s, full = load_suite(copy.deepcopy(ORDER_SUITE)), load_suite(copy.deepcopy(SUITE))
    for name, want in (("ANA in. liver-high", "top"), ("GRASP liver-high", "top"), ("ANA in. lesion-low", "bottom")):
        c = codes(s.arm(name))
        ranked = sorted(c, key=c.get, reverse=want == "top")
        assert set(ranked[:len(lesion)]) == lesion                  # the lesion organs take the top / lowest codes
    off = codes(s.arm("ANA in. offset"))
    assert min(off.values()) == pytest.approx(0.6) and off[labels["liver"]] == pytest.approx(0.6)
    for name in ("Organs", "nnU-Net", "ANA in."):                     # same runs as the anatomy suite's: reused
        assert s.run_key(s.arm(name), 1) == full.run_key(full.arm(name), 1)


# ----------------------------------------------------------------------------------------------- trainers on a phantom
@pytest.fixture(scope="module")
def organ_model(tiny_planned, tmp_path_factory):
    """An organ-model results folder with the tiny phantom's plans, one CT channel and 5 organ classes (untrained
    weights: these tests check the mechanics; nnx_bench anatomy trains a real one)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    pp = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned)
    plans = json.load(open(os.path.join(pp, PLANS + ".json")))
    dj = json.load(open(os.path.join(pp, "dataset.json")))
    dj = {**{k: v for k, v in dj.items() if k != "nnx"}, "channel_names": {"0": "CT"}, "labels": ORGANS}
    folder = tmp_path_factory.mktemp("organs") / f"nnUNetTrainer__{PLANS}__3d_fullres"
    os.makedirs(folder / "fold_0")
    json.dump(plans, open(folder / "plans.json", "w"))
    json.dump(dj, open(folder / "dataset.json", "w"))
    torch.manual_seed(1)
    pm = PlansManager(plans)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 6, True)
    torch.save({"network_weights": net.state_dict()}, folder / "fold_0" / "checkpoint_final.pth")
    return str(folder)


def _trainer(dataset, cls_name, opts="", fold=0):
    from nnx.registry import load_trainer
    os.environ["NNX_TRAINER_OPTS"] = opts
    try:
        pp = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
        plans = json.load(open(os.path.join(pp, PLANS + ".json")))
        plans["continue_training"] = False
        return load_trainer(cls_name)(plans=plans, configuration="3d_fullres", fold=fold,
                                      dataset_json=json.load(open(os.path.join(pp, "dataset.json"))),
                                      device=torch.device("cpu"))
    finally:
        os.environ.pop("NNX_TRAINER_OPTS", None)


@pytest.fixture
def one_thread(monkeypatch):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def grasp(tiny_planned, organ_model):
    """A GRASP trainer on the tiny phantom (fusion from epoch 1 of 4), initialised, with its data loaders."""
    mp = pytest.MonkeyPatch()
    mp.setenv("nnUNet_n_proc_DA", "0")
    t = _trainer(tiny_planned, "GRASPTrainer", f"anatomy_model={organ_model} epochs=4 iters_per_epoch=1 "
                                               f"fusion_start_fraction=0.25")
    t.initialize()
    dl_tr, dl_val = t.get_dataloaders()
    yield t, dl_tr, dl_val
    mp.undo()


def test_grasp_is_plain_before_the_switch_epoch_and_in_eval_mode(grasp, one_thread):
    t, dl_tr, _ = grasp
    assert t.grasp_start_epoch == 1                                  # round(0.25 * 4); thesis: 50 of 300
    batch = next(dl_tr)
    x = batch["data"]
    assert x.shape[1] == 3                                           # CT, PET, scaled anatomy channel
    assert torch.allclose(x[:, 2:], batch["anatomy"].float() / 5.0)  # id / C_ana, aligned with the batch entry
    net = t.network
    net.train()
    t.current_epoch = 0
    with torch.no_grad():
        plain = net(x)[0]
        assert torch.equal(t.grasp_forward(x)[0], plain)             # epoch 0 < 1: bit-identical
        t.current_epoch = 1
        fused = t.grasp_forward(x)[0]
        assert not torch.allclose(fused, plain)                      # fusion on from epoch 1 (training mode)
        net.eval()
        assert torch.equal(t.grasp_forward(x)[0], net(x)[0])         # eval mode: never fused
    net.train()


def test_grasp_step_leaves_the_frozen_encoder_unchanged(grasp, one_thread):
    t, dl_tr, _ = grasp
    enc = t.grasp_anatomy.encoder
    before_enc = {k: v.clone() for k, v in enc.state_dict().items()}
    before_fusion = [p.detach().clone() for p in t.grasp_fusion.parameters()]
    before_net = [p.detach().clone() for p in t.network.parameters()]
    t.network.train()
    t.current_epoch = 1
    out = t.train_step(next(dl_tr))
    assert np.isfinite(out["loss"])
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert all(torch.equal(v, before_enc[k]) for k, v in enc.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(before_fusion, t.grasp_fusion.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before_net, t.network.parameters()))
    assert not any("fusion" in k or "anatomy" in k for k in t.network.state_dict())  # fusion outside the network
    extra = t.nnx_extra_state()
    assert set(extra["fusion"]) == set(t.grasp_fusion.state_dict()) and extra["anatomy_model"] == t.grasp_anatomy.folder
    assert not any(k.startswith("encoder.") or "stages" in k.split(".")[0] for k in extra["fusion"])


def test_grasp_checkpoint_predicts_with_nnunets_own_network_exactly_as_nnx_predict(grasp, tiny_planned, tmp_path,
                                                                                   one_thread, monkeypatch):
    """The saved network weights load strictly into nnU-Net's own planned network (images + 1 anatomy channel);
    nnU-Net's predictor with that network gives exactly nnx_predict's output."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnx import inference_inputs
    from nnx.cli.predict import predict_folder
    from nnx.ext_path import SHIM_DIR
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)                # nnx_predict finds the trainer by name
    t, _, _ = grasp
    model = tmp_path / "model"
    os.makedirs(model / "fold_0")
    pp = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned)
    for f in (PLANS + ".json", "dataset.json"):
        shutil.copy(os.path.join(pp, f), model / ("plans.json" if f.startswith(PLANS) else f))
    t.save_checkpoint(str(model / "fold_0" / "checkpoint_final.pth"))
    ck = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["nnx_inputs"] == [{"name": "anatomy", "values": [[[v, v / 5] for v in range(1, 6)]]}]
    raw = os.path.join(os.environ["nnUNet_raw"], tiny_planned)
    images, anat = os.path.join(raw, "imagesTs"), os.path.join(raw, "anatomyTs")
    cases = sorted(f[:-12] for f in os.listdir(images) if f.endswith("_0000.nii.gz"))[:1]
    sub = tmp_path / "images"
    os.makedirs(sub)
    for c in cases:
        for ch in (0, 1):
            shutil.copy(os.path.join(images, f"{c}_{ch:04d}.nii.gz"), sub)
    inputs = inference_inputs.model_inputs(str(model), [0], "checkpoint_final.pth")
    predict_folder(str(sub), str(tmp_path / "nnx"), str(model), [0], "checkpoint_final.pth", torch.device("cpu"),
                   tta=False, progress=False, inputs=inputs, input_folders={"anatomy": anat}, cases=cases)

    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                           device=torch.device("cpu"), allow_tqdm=False)
    pm, cm = t.plans_manager, t.configuration_manager
    stock = nnUNetTrainer.build_network_architecture(pm, cm, 3, t.label_manager.num_segmentation_heads, False)
    stock.load_state_dict(ck["network_weights"], strict=True)       # nnU-Net's own network, no GRASP module
    pred.manual_initialization(stock, pm, cm, [ck["network_weights"]], t.dataset_json, "nnUNetTrainer", None)
    os.makedirs(tmp_path / "stock")
    items = inference_inputs.iterate_preprocessed(str(sub), cases, {"anatomy": anat}, inputs, pred,
                                                  str(tmp_path / "stock"))
    pred.predict_from_data_iterator(items, False, 1)
    for c in cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nnx" / f"{c}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "stock" / f"{c}.nii.gz")))
        assert np.array_equal(a, b)


def test_grasp_inference_fusion_on_runs_the_fused_network_in_validation_and_in_nnx_predict(
        grasp, tiny_planned, tmp_path, one_thread, monkeypatch):
    """inference_fusion=on (the spec's keep-fusion-at-inference variant): after the switch epoch, eval mode runs
    encoder -> fusion (frozen organ encoder) -> decoder; nnx_predict --opt inference_fusion=on on a checkpoint
    trained with fusion dropped gives exactly that network's probabilities, which differ from the plain network's."""
    from nnx import inference_inputs
    from nnx.cli.predict import predict_folder
    from nnx.ext_path import SHIM_DIR
    from nnx.options import write_config
    from nnx_plugins.anatomy.trainer import GRASPFusedNet
    monkeypatch.setenv("nnUNet_extTrainer", SHIM_DIR)
    t, dl_tr, _ = grasp
    x = next(dl_tr)["data"]
    t.current_epoch = 2                                               # after the switch (epoch 1)
    plain_net = t.network
    plain_net.eval()
    fused = GRASPFusedNet(plain_net, t.grasp_fusion, t.grasp_anatomy, 0).eval()
    with torch.no_grad():
        plain, want = plain_net(x)[0], fused(x)[0]
        assert not torch.allclose(plain, want)
        assert torch.equal(t.grasp_forward(x)[0], plain)              # default off: eval mode is plain
        monkeypatch.setitem(t.nnx_opts, "inference_fusion", "on")
        assert torch.equal(t.grasp_forward(x)[0], want)               # on: eval mode is fused
        with t.nnx_eval_network():                                   # nnU-Net's validation sees the fused net
            assert isinstance(t.network, GRASPFusedNet) and torch.equal(t.network(x)[0], want)
        assert t.network is plain_net and t.grasp_fusion.training
        t.current_epoch = 0
        with t.nnx_eval_network():                                   # before the switch: plain, as trained
            assert t.network is plain_net
    monkeypatch.setitem(t.nnx_opts, "inference_fusion", "off")

    model = tmp_path / "model"
    os.makedirs(model / "fold_0")
    pp = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned)
    for f in (PLANS + ".json", "dataset.json"):
        shutil.copy(os.path.join(pp, f), model / ("plans.json" if f.startswith(PLANS) else f))
    write_config(str(model / "fold_0"), "GRASPTrainer", t.nnx_opts, "test")  # trained with inference_fusion=off
    ck_path = model / "fold_0" / "checkpoint_final.pth"
    t.current_epoch = 0
    t.save_checkpoint(str(ck_path))                                   # saved before the fusion was trained
    raw = os.path.join(os.environ["nnUNet_raw"], tiny_planned)
    images, anat = os.path.join(raw, "imagesTs"), os.path.join(raw, "anatomyTs")
    cases = sorted(f[:-12] for f in os.listdir(images) if f.endswith("_0000.nii.gz"))[:1]
    sub = tmp_path / "images"
    os.makedirs(sub)
    for ch in (0, 1):
        shutil.copy(os.path.join(images, f"{cases[0]}_{ch:04d}.nii.gz"), sub)
    inputs = inference_inputs.model_inputs(str(model), [0], "checkpoint_final.pth")
    on = inference_inputs.inference_option_overrides("GRASPTrainer", {"inference_fusion": "on"})

    def predict(name, options):
        predict_folder(str(sub), str(tmp_path / name), str(model), [0], "checkpoint_final.pth",
                       torch.device("cpu"), tta=False, save_probabilities=True, progress=False, inputs=inputs,
                       input_folders={"anatomy": anat}, cases=cases, options=options)
        return np.load(tmp_path / name / f"{cases[0]}.npz")["probabilities"]

    with pytest.raises(NNXError, match="fusion was never trained"):
        predict("early", on)
    t.current_epoch = 2
    t.save_checkpoint(str(ck_path))
    p_off, p_on = predict("off", None), predict("on", on)

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    pred = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, perform_everything_on_device=False,
                           device=torch.device("cpu"), allow_tqdm=False)
    ref = GRASPFusedNet(t.network, t.grasp_fusion, t.grasp_anatomy, 0)
    pred.manual_initialization(ref, t.plans_manager, t.configuration_manager, [ref.state_dict()], t.dataset_json,
                               "GRASPTrainer", None)
    t.set_deep_supervision_enabled(False)
    try:
        os.makedirs(tmp_path / "ref")
        items = inference_inputs.iterate_preprocessed(str(sub), cases, {"anatomy": anat}, inputs, pred,
                                                      str(tmp_path / "ref"))
        pred.predict_from_data_iterator(items, True, 1)
    finally:
        t.set_deep_supervision_enabled(True)
        t.network.train()
        t.grasp_fusion.train()
    p_ref = np.load(tmp_path / "ref" / f"{cases[0]}.npz")["probabilities"]
    assert np.allclose(p_on, p_ref, atol=1e-5)                        # the hook assembled the same network
    assert not np.allclose(p_on, p_off, atol=1e-3)                    # and it is not the plain one

    other = tmp_path / "moved" / os.path.basename(t.grasp_anatomy.folder)  # a moved organ model is accepted ...
    shutil.copytree(t.grasp_anatomy.folder, other)
    assert np.allclose(predict("moved", {**on, "anatomy_model": str(other)}), p_on, atol=1e-6)
    ck_other = other / "fold_0" / "checkpoint_final.pth"                  # ... another one is refused
    w = torch.load(ck_other, weights_only=False)
    k = next(k for k in w["network_weights"] if k.startswith("encoder."))
    w["network_weights"][k].add_(1.0)                  # in place: the state dict holds aliases of the same tensor
    torch.save(w, ck_other)
    with pytest.raises(NNXError, match="not the one this checkpoint was trained with"):
        predict("other", {**on, "anatomy_model": str(other)})
    with pytest.raises(NNXError, match="cannot be changed at prediction time"):
        inference_inputs.inference_option_overrides("GRASPTrainer", {"heads": "4"})
    with pytest.raises(NNXError, match="must be one of"):
        inference_inputs.inference_option_overrides("GRASPTrainer", {"inference_fusion": "maybe"})
    with pytest.raises(NNXError, match="takes no prediction-time options"):
        inference_inputs.inference_option_overrides("AnatomyInputTrainer", {"inference_fusion": "on"})


def test_anatomy_offset_option_reaches_the_input_encoding_and_bad_values_are_refused(tiny_planned):
    t = _trainer(tiny_planned, "AnatomyInputTrainer", "anatomy_offset=0.5")
    assert t.nnx_input_encoding("anatomy", [0, 1, 2, 3, 4, 5]) == [[[1, 0.6], [2, 0.7], [3, 0.8], [4, 0.9], [5, 1.0]]]
    for opts, msg in (("anatomy_offset=1", r"must be in \[0, 1\)"), ("anatomy_offset=-0.2", r"must be in \[0, 1\)"),
                      ("anatomy_encoding=onehot anatomy_offset=0.5", "scaled only"),
                      ("anatomy_offset=half", "expects float")):
        with pytest.raises(NNXError, match=msg):
            _trainer(tiny_planned, "AnatomyInputTrainer", opts)


def test_bad_organ_model_folders_give_one_line_errors(tiny_planned, organ_model, tmp_path, capsys, monkeypatch):
    from nnx_plugins.anatomy.mirror import load_anatomy_model
    t = _trainer(tiny_planned, "AnatomyInputTrainer")             # this run's plans / dataset.json

    def err(folder, **kw):
        with pytest.raises(NNXError) as e:
            load_anatomy_model(str(folder), kw.get("fold", "0"), "checkpoint_final.pth", t.plans_manager,
                               t.configuration_manager, "3d_fullres", t.dataset_json, kw.get("ct", 0),
                               torch.device("cpu"))
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "not found" in err(tmp_path / "nowhere")
    assert "no checkpoint_final.pth for fold 3" in err(organ_model, fold="3")
    assert "no organ model given" in err("")

    def variant(name, fn):
        d = tmp_path / name / os.path.basename(organ_model)
        shutil.copytree(organ_model, d)
        for f in ("plans.json", "dataset.json"):
            obj = json.load(open(d / f))
            fn(f, obj)
            json.dump(obj, open(d / f, "w"))
        return d

    def patch(f, o):
        if f == "plans.json":
            o["configurations"]["3d_fullres"]["patch_size"] = [16, 32, 32]

    def spacing(f, o):
        if f == "plans.json":
            o["configurations"]["3d_fullres"]["spacing"] = [3.0, 1.0, 1.0]

    def channels(f, o):
        if f == "dataset.json":
            o["channel_names"] = {"0": "CT", "1": "PET"}

    assert "patch size" in err(variant("patch", patch))
    assert "spacing" in err(variant("spacing", spacing))
    assert "2 input channels" in err(variant("channels", channels))
    assert "not CTNormalization" in err(organ_model, ct=1)           # PET is not a CT channel
    from nnx.cli.train import main                                   # and through nnx_train: one line, exit 2
    for var in ("NNX_TRAINER_OPTS", "NNX_TRAINER_OPTS_SOURCE", "nnUNet_extTrainer"):  # main() exports them:
        monkeypatch.setenv(var, "")                 # recorded (an unset variable is not recorded by delenv alone),
        monkeypatch.delenv(var)                     # so teardown restores it and nothing leaks into later tests
    capsys.readouterr()
    rc = main([tiny_planned.split("_")[0][7:], "3d_fullres", "0", "-tr", "GRASPTrainer", "-device", "cpu", "--opt",
               f"anatomy_model={tmp_path / 'nowhere'}"])
    e = capsys.readouterr().err
    assert rc == 2 and len(e.strip().splitlines()) == 1 and "organ model folder not found" in e, e


def test_multitask_step_trains_the_anatomy_decoder_outside_the_network(tiny_planned, one_thread):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    t = _trainer(tiny_planned, "AnatomyMultiTaskTrainer", "iters_per_epoch=1 anatomy_groups=liver+kidney/spleen")
    t.initialize()
    assert t.mt_num_classes == 3
    dl_tr, _ = t.get_dataloaders()
    batch = next(dl_tr)
    assert batch["data"].shape[1] == 2                                # image only
    a = batch["anatomy"]
    tgt = t.anatomy_target(a)
    assert torch.equal(tgt, torch.where((a == 1) | (a == 3), 1, torch.where(a == 2, 2, 0)).long())
    dec_before = [p.detach().clone() for p in t.anatomy_decoder.parameters()]
    t.network.train()
    out = t.train_step(batch)
    assert np.isfinite(out["loss"]) and np.isfinite(out["l_ana"])
    assert any(not torch.equal(x, y) for x, y in zip(dec_before, t.anatomy_decoder.parameters()))
    assert int(t.mt_loss.steps) == 1 and float(t.mt_loss.m_ana) == pytest.approx(abs(float(out["l_ana"])), rel=1e-5)
    stock = nnUNetTrainer.build_network_architecture(t.plans_manager, t.configuration_manager, 2,
                                                     t.label_manager.num_segmentation_heads, True)
    stock.load_state_dict(t.network.state_dict(), strict=True)       # inference network: nnU-Net's own


# ----------------------------------------------------------------------------------------------- a real organ map
@pytest.fixture(scope="module")
def real_anatomy(nnunet_env):
    """Dataset 907: the real TotalSegmentator CT (3 mm, cropped to 30 x 64 x 80) with its organ map (TotalSegmentator
    output) as the anatomy aux map (read from shared/data, written into the session's nnUNet_raw); 2 cases (the
    second mirrored), a lesion label = the brighter voxels of the first organ; planned through nnx_plan."""
    import SimpleITK as sitk
    from nnx.cli.plan import main as plan
    # a 30 x 64 x 80 region (36 of the 41 classes): real spacing and direction, a quarter of the training cost
    roi = lambda img: sitk.RegionOfInterest(img, [80, 64, 30], [20, 18, 0])  # noqa: E731  (x, y, z)
    ct_img = roi(sitk.ReadImage(os.path.join(TS_DATA, "example_ct_sm.nii.gz")))
    seg_img = roi(sitk.ReadImage(os.path.join(TS_DATA, "example_seg.nii.gz")))
    ct, seg = sitk.GetArrayFromImage(ct_img), sitk.GetArrayFromImage(seg_img).astype(np.int16)
    ids = sorted(int(v) for v in np.unique(seg) if v)
    name = "Dataset907_TSAnatomy"
    root = os.path.join(nnunet_env["nnUNet_raw"], name)
    for d in ("imagesTr", "labelsTr", "anatomyTr", "anatomyTs"):
        os.makedirs(os.path.join(root, d), exist_ok=True)

    def write(arr, path):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ct_img)
        sitk.WriteImage(img, path, True)

    organ = seg == ids[0]
    lesion = (organ & (ct >= np.percentile(ct[organ], 60))).astype(np.uint8)
    for i, flip in enumerate((False, True)):
        f = (lambda a: a[:, :, ::-1].copy()) if flip else (lambda a: a)
        c = f"ts_{i:03d}"
        write(f(ct), os.path.join(root, "imagesTr", f"{c}_0000.nii.gz"))
        write(f(lesion), os.path.join(root, "labelsTr", f"{c}.nii.gz"))
        write(f(seg), os.path.join(root, "anatomyTr", f"{c}.nii.gz"))
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
          "file_ending": ".nii.gz",
          "nnx": {"format_version": 1, "tiers": {"ts_000": "expert", "ts_001": "expert"},
                  "aux_maps": {"anatomy": {"train": "anatomyTr", "test": "anatomyTs",
                                           "labels": {"background": 0, **{f"organ_{v}": v for v in ids}}}}}}
    json.dump(dj, open(os.path.join(root, "dataset.json"), "w"))
    assert plan(["-d", "907", "-c", "3d_fullres", "-np", "1"]) == 0
    return {"name": name, "ids": ids, "seg": seg, "root": root}


def test_real_organ_map_label_ids_survive_preprocessing_and_train(real_anatomy, one_thread):
    import blosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.extras import prepare_label_map
    name, ids = real_anatomy["name"], real_anatomy["ids"]
    assert len(ids) > 30                                              # a real multi-organ map
    pp = os.path.join(os.environ["nnUNet_preprocessed"], name)
    plans = json.load(open(os.path.join(pp, PLANS + ".json")))
    cm_name = "3d_fullres"
    folder = os.path.join(pp, plans["configurations"][cm_name]["data_identifier"] + "__nnx", "anatomy")
    for c in ("ts_000", "ts_001"):
        arr = blosc2.open(os.path.join(folder, c + ".b2nd"))[:]
        assert sorted(int(v) for v in np.unique(arr) if v) == ids     # every ID kept, none invented
    # label-safe resampling of the real map to a coarser grid: IDs only ever a subset of the original ones
    import pickle
    pm = PlansManager(plans)
    cm = pm.get_configuration(cm_name)
    props = pickle.load(open(os.path.join(pp, cm.data_identifier, "ts_000.pkl"), "rb"))
    coarse = [int(s * 0.6) for s in props["shape_after_cropping_and_before_resampling"]]
    res = prepare_label_map(real_anatomy["seg"][None], props, coarse, pm, cm, "example_seg.nii.gz")
    got = {int(v) for v in np.unique(res) if v}
    assert got <= set(ids) and len(got) >= 0.8 * len(ids)
    # one training step of ANA in. (one-hot over two organ groups) on the real map
    t = _trainer(name, "AnatomyInputTrainer", f"iters_per_epoch=1 anatomy_encoding=onehot "
                                              f"anatomy_groups={ids[0]}+{ids[1]}/{ids[2]}", fold="all")
    t.initialize()
    dl_tr, _ = t.get_dataloaders()
    batch = next(dl_tr)
    a = batch["anatomy"]
    assert torch.equal(batch["data"][:, 1], ((a == ids[0]) | (a == ids[1]))[:, 0].float())
    assert torch.equal(batch["data"][:, 2], (a == ids[2])[:, 0].float())
    t.network.train()
    out = t.train_step(batch)
    assert np.isfinite(out["loss"])
