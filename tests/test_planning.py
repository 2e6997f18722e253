"""Plugin-aware planning: stock equivalence, monotonicity, profile algebra, budgets, CPU plans, measurement."""
from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from conftest import TINY_ID, make_fingerprint_dataset, nnx_cmd, run_cli
from nnx.trainer_base import nnxTrainer

BIG_ID, ISO_ID = 960, 961


class Double(nnxTrainer):
    nnx_memory = {"activation_factor": 2.0}


class Static2(nnxTrainer):
    nnx_memory = {"static_gb": 2.0}


class SecondNet(nnxTrainer):
    """Two networks: the planned U-Net plus one with half the features."""
    nnx_memory = {"extra_architectures": [{"feature_scale": 0.5}]}


@pytest.fixture(scope="module")
def big(nnunet_env):
    """Anisotropic CT-like dataset (fingerprint only): 40 cases 160x400x400 at 2.5x0.8x0.8 mm."""
    return make_fingerprint_dataset(BIG_ID, "FakeAniso")


@pytest.fixture(scope="module")
def iso(nnunet_env):
    """A second shape and spacing: isotropic MR-like, 30 cases 180x220x200 at 1.2 mm, 2 labels."""
    return make_fingerprint_dataset(ISO_ID, "FakeIso", n_cases=30, spacing=(1.2, 1.2, 1.2), shape=(180, 220, 200),
                                    n_labels=2, channel="T1")


@pytest.fixture(autouse=True)
def _calibration_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NNX_HOME", str(tmp_path / "nnx_home"))


def stock_plans(dataset: str, dataset_id: int) -> dict:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments
    with contextlib.redirect_stdout(io.StringIO()):
        plan_experiments([dataset_id], "ExperimentPlanner")
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset, "nnUNetPlans.json")) as f:
        return json.load(f)


def nnx_plans(dataset: str, **kw) -> dict:
    from nnx.planning import plan_for_trainer
    pid, _ = plan_for_trainer(dataset, kw.pop("trainer", "nnUNetTrainer"), **kw)
    with open(os.path.join(os.environ["nnUNet_preprocessed"], dataset, pid + ".json")) as f:
        return json.load(f)


def strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "nnx_memory"}


@pytest.mark.parametrize("which", ["big", "iso"])
def test_stock_trainer_plans_equal_stock_planning(which, request):
    dataset = request.getfixturevalue(which)
    did = BIG_ID if which == "big" else ISO_ID
    a = stock_plans(dataset, did)
    b = nnx_plans(dataset)
    assert set(a["configurations"]) == set(b["configurations"])
    for c in a["configurations"]:
        assert strip(b["configurations"][c]) == a["configurations"][c], c  # spacing, patch, batch, architecture
    for k in ("transpose_forward", "original_median_spacing_after_transp", "foreground_intensity_properties_per_channel"):
        assert a[k] == b[k]
    assert b["nnx"]["trainer"] == "nnUNetTrainer" and b["plans_name"] == "nnxPlans_nnUNetTrainer_8GB"


def test_stock_trainer_plans_equal_on_the_phantom(tiny_planned):
    base = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned)
    with open(os.path.join(base, "nnUNetPlans.json")) as f:
        a = json.load(f)  # written by stock nnU-Net's planner through nnx_plan's default path
    b = nnx_plans(tiny_planned)
    for c in a["configurations"]:
        assert strip(b["configurations"][c]) == a["configurations"][c], c


def _voxels_per_step(r):
    return int(np.prod(r["patch_size"])) * r["batch_size"]


def test_larger_budget_never_gives_fewer_voxels_per_step(big, iso):
    from nnx.planning import fullres_plan
    from nnx.registry import load_trainer
    for dataset in (big, iso):
        for cls in (load_trainer("nnUNetTrainer"), Double, SecondNet):
            seq = [_voxels_per_step(fullres_plan(dataset, cls, b)) for b in (3, 4, 6, 8, 12, 16, 24, 40, 80)]
            assert seq == sorted(seq), (dataset, cls.__name__, seq)
            assert seq[-1] > seq[0]


@pytest.mark.parametrize("budget", [8, 16, 48])
def test_factor_two_at_b_plans_like_identity_at_half_b(big, budget):
    from nnx.planning import fullres_plan
    from nnx.registry import load_trainer
    ident = fullres_plan(big, load_trainer("nnUNetTrainer"), budget / 2)
    double = fullres_plan(big, Double, budget)
    for k in ("patch_size", "batch_size", "architecture"):
        assert double[k] == ident[k], k
    static = fullres_plan(big, Static2, budget / 2 + 2)
    assert static["patch_size"] == ident["patch_size"] and static["batch_size"] == ident["batch_size"]
    assert static["predicted_gb"] == pytest.approx(ident["predicted_gb"] + 2, rel=1e-6)


def test_extra_architecture_estimates_add_up(big):
    from nnx.planning import base_estimate, planner_class
    from nnx.memory import memory_profile
    P = planner_class("default", memory_profile(SecondNet))
    with contextlib.redirect_stdout(io.StringIO()):
        pl = P(big, gpu_memory_target_in_gb=8, plans_name="tmp_sum")
    patch = [64, 128, 128]
    kw = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
          "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * 5,
          "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
          "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
          "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
          "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
          "nonlin_kwargs": {"inplace": True}}
    req = ("conv_op", "norm_op", "dropout_op", "nonlin")
    cls_name = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
    one = base_estimate(patch, 1, 4, cls_name, kw, req)
    half = base_estimate(patch, 1, 4, cls_name, dict(kw, features_per_stage=[16, 32, 64, 128, 160, 160]), req)
    assert 0 < half < one
    assert pl.static_estimate_VRAM_usage(patch, 1, 4, cls_name, kw, req) == pytest.approx(one + half)


def test_budget_below_smallest_configuration_is_a_clear_error(big, tiny_planned):
    from nnx.planning import BudgetTooSmall, fullres_plan
    from nnx.registry import load_trainer
    with pytest.raises(BudgetTooSmall, match="smallest viable configuration"):
        fullres_plan(big, load_trainer("nnUNetTrainer"), 0.01)
    with pytest.raises(BudgetTooSmall, match="static memory"):
        fullres_plan(big, Static2, 1.5)
    r = run_cli(nnx_cmd("plan", "-d", str(TINY_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainer",
                        "-gpu_memory_target", "0.001", "--no-preprocess"))
    assert r.returncode == 2 and "smallest viable configuration" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    r = run_cli(nnx_cmd("plan", "-d", str(TINY_ID), "-tr", "nnUNetTrainer", "-gpu_memory_target", "-3"))
    assert r.returncode == 2 and "must be > 0" in r.stderr


def test_cpu_plans_are_small_and_labelled(big):
    from nnx.planning import CPU_MAX_PATCH_VOXELS
    p = nnx_plans(big, device="cpu")
    cfg = p["configurations"]["3d_fullres"]
    assert np.prod(cfg["patch_size"]) <= CPU_MAX_PATCH_VOXELS and cfg["batch_size"] == 2
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"][0] == 16
    assert max(cfg["architecture"]["arch_kwargs"]["features_per_stage"]) <= 128
    assert p["nnx"]["device"] == "cpu" and "CPU plan" in p["nnx"]["note"] and p["plans_name"].endswith("_cpu")
    assert cfg["data_identifier"] == "nnUNetPlans_3d_fullres"  # same spacing/normalisation: stock data reused


def test_calibration_fit_and_use(big, tmp_path):
    from nnx.memory import effective_profile, fit_profile, store_calibration
    from nnx.planning import fullres_plan
    fit = fit_profile([(2, 1.0), (4, 1.8)], [(2, 2.0), (4, 3.6)])  # stock: 0.2 + 0.4 b; trainer: 0.4 + 0.8 b
    assert fit["activation_factor"] == pytest.approx(2.0) and fit["static_gb"] == pytest.approx(0.2)

    class Declared(nnxTrainer):
        nnx_memory = {"activation_factor": 1.0}

    assert effective_profile(Declared, "cuda")[1] == "declared"
    store_calibration("Declared", "cuda", fit)
    prof, src = effective_profile(Declared, "cuda")
    assert prof["activation_factor"] == 2.0 and src.startswith("calibrated")
    assert effective_profile(Declared, "cpu")[1] == "declared"  # per device kind
    from nnx.registry import load_trainer
    a = fullres_plan(big, Declared, 8.2)
    b = fullres_plan(big, load_trainer("nnUNetTrainer"), 4.0)
    assert a["patch_size"] == b["patch_size"] and a["batch_size"] == b["batch_size"]


def test_measure_on_cpu_records_peak_and_plans_train(tiny_planned):
    """-device cpu --measure: real steps of the planned configuration; the measurement lands in the plans next to
    the prediction, and nnx_train -p accepts the plans."""
    r = run_cli(nnx_cmd("plan", "-d", str(TINY_ID), "-c", "3d_fullres", "-tr", "nnUNetTrainer", "-device", "cpu",
                        "-np", "1", "--measure", "--steps", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reusing preprocessed data nnUNetPlans_3d_fullres" in r.stdout
    path = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned, "nnxPlans_nnUNetTrainer_cpu.json")
    with open(path) as f:
        mem = json.load(f)["configurations"]["3d_fullres"]["nnx_memory"]
    m = mem["measured"]["cpu"]
    assert m["peak_gb"] > 0 and m["steps"] == 2 and "RSS" in m["method"] and mem["predicted_gb"] > 0
    r = run_cli(nnx_cmd("train", str(TINY_ID), "3d_fullres", "0", "-p", "nnxPlans_nnUNetTrainer_cpu", "-device", "cpu",
                        "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1"), {"nnUNet_n_proc_DA": "0"})
    assert r.returncode == 0, r.stderr[-2000:]
    fold = os.path.join(os.environ["nnUNet_results"], tiny_planned,
                        "nnUNetTrainer__nnxPlans_nnUNetTrainer_cpu__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(fold, "validation", "summary_cc.json"))  # stock trainer: written by nnx_train


def test_table_lists_every_trainer_and_budget(big):
    from nnx.registry import trainer_names
    r = run_cli(nnx_cmd("plan", "-d", str(BIG_ID), "--table"))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("  ") and "GB" in ln and "predicted" not in ln]
    for name in trainer_names():
        assert len([ln for ln in rows if ln.split()[0] == name]) == 6, name


def test_fingerprint_sample_count_from_the_flag_or_the_environment(tiny_dataset, monkeypatch, capsys):
    """nnU-Net's extractor samples 1e8 foreground voxels whatever the dataset's size; --fingerprint-samples /
    $NNX_FINGERPRINT_SAMPLES set that number (the flag wins), and a bad value stops nnx_plan in one line."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnx.cli import plan
    seen = []
    monkeypatch.setattr(DatasetFingerprintExtractor, "run",
                        lambda self, overwrite_existing=False: seen.append(
                            (self.num_foreground_voxels_for_intensitystats, overwrite_existing)))
    plan.extract_fingerprint(TINY_ID, 1, True, samples=5000)
    plan.extract_fingerprint(TINY_ID, 1, True)
    assert seen == [(5000, True), (1e8, True)]
    monkeypatch.setenv("NNX_FINGERPRINT_SAMPLES", "2e6")
    assert plan.fingerprint_samples() == 2_000_000 and plan.fingerprint_samples(3000) == 3000
    monkeypatch.delenv("NNX_FINGERPRINT_SAMPLES")
    assert plan.fingerprint_samples() is None
    capsys.readouterr()
    for env, args, needle in (("lots", [], "NNX_FINGERPRINT_SAMPLES must be a number of voxels, got 'lots'"),
                              (None, ["--fingerprint-samples", "10"], "--fingerprint-samples must be >= 1000, got 10")):
        if env is None:
            monkeypatch.delenv("NNX_FINGERPRINT_SAMPLES", raising=False)
        else:
            monkeypatch.setenv("NNX_FINGERPRINT_SAMPLES", env)
        assert plan.main(["-d", str(TINY_ID), "-c", "3d_fullres", "--no-preprocess", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert seen == [(5000, True), (1e8, True)]  # nothing was extracted


def test_nnx_plans_never_overwrite_nnunets_own_plans(tiny_planned, capsys):
    from nnx.cli import plan
    path = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned, "nnUNetPlans.json")
    before = open(path, "rb").read()
    capsys.readouterr()
    assert plan.main(["-d", str(TINY_ID), "-c", "3d_fullres", "-device", "cpu", "-overwrite_plans_name",
                      "nnUNetPlans", "--no-preprocess"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nnUNetPlans.json" in err[0] and "plans 'nnUNetPlans' are nnU-Net's own" in err[0], err
    assert open(path, "rb").read() == before
