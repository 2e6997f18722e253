"""End-to-end: plan, train, predict, evaluate, export, through nnx_* and through stock nnU-Net with the shim."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import TINY_ID, nnx_cmd, run_cli

pytestmark = pytest.mark.slow
FAST = ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1"]


def stock(cmd: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), cmd)
    return path if os.path.exists(path) else shutil.which(cmd)


def read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def results_dir(env, dataset, trainer, config="3d_fullres", plans="nnUNetPlans"):
    return os.path.join(env["nnUNet_results"], dataset, f"{trainer}__{plans}__{config}")


@pytest.fixture(scope="module")
def stock_trained(tiny_planned, nnunet_env):
    """nnUNetTrainer trained for one short epoch through nnx_train (full stock run_training incl. validation)."""
    r = run_cli(nnx_cmd("train", str(TINY_ID), "3d_fullres", "0", "-device", "cpu", *FAST),
                env={"nnUNet_n_proc_DA": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    return tiny_planned


def test_nnx_cycle_stock_trainer(stock_trained, nnunet_env, tmp_path):
    out = results_dir(nnunet_env, stock_trained, "nnUNetTrainer")
    fold = os.path.join(out, "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    cfg = json.load(open(os.path.join(fold, "nnx_config.json")))
    assert cfg["options"]["epochs"] == 1 and cfg["options"]["iters_per_epoch"] == 2
    # stock validation ran and wrote its summary
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))

    raw = os.path.join(nnunet_env["nnUNet_raw"], stock_trained)
    pred = tmp_path / "pred"
    r = run_cli(nnx_cmd("predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(pred), "-d", str(TINY_ID),
                        "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta", "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]
    n_test = len(os.listdir(os.path.join(raw, "labelsTs")))
    preds = sorted(f for f in os.listdir(pred) if f.endswith(".nii.gz"))
    assert len(preds) == n_test
    img = sitk.ReadImage(os.path.join(raw, "imagesTs", preds[0].replace(".nii.gz", "_0000.nii.gz")))
    seg = sitk.ReadImage(str(pred / preds[0]))
    assert seg.GetSize() == img.GetSize() and np.allclose(seg.GetSpacing(), img.GetSpacing())
    assert np.allclose(seg.GetOrigin(), img.GetOrigin())

    r = run_cli(nnx_cmd("evaluate", "-ref", os.path.join(raw, "labelsTs"), "-pred", str(pred), "-d", str(TINY_ID)))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(pred / "summary.json"))
    assert len(summary["metric_per_case"]) == n_test
    assert "Dice" in summary["foreground_mean"]
    assert "foreground mean" in r.stdout


def test_stock_nnunet_with_shim_and_export(tiny_planned, nnunet_env, tmp_path):
    """Stock nnUNetv2_train/_predict run an nnx plugin trainer through nnUNet_extTrainer; the exported model
    runs under stock nnUNetv2_predict_from_modelfolder without any nnx variable and reproduces nnx_predict."""
    shim = run_cli([sys.executable, "-m", "nnx.ext_path"])
    assert shim.returncode == 0
    shim_dir = shim.stdout.strip()
    assert os.path.isfile(os.path.join(shim_dir, "nnx_trainer_index.py"))
    env = {"nnUNet_extTrainer": shim_dir, "nnUNet_n_proc_DA": "0",
           "NNX_TRAINER_OPTS": "epochs=2 iters_per_epoch=2 val_iters=1"}
    r = run_cli([stock("nnUNetv2_train"), str(TINY_ID), "3d_fullres", "0", "-tr", "RotNPCTrainer",
                 "-device", "cpu"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = results_dir(nnunet_env, tiny_planned, "RotNPCTrainer")
    cfg = json.load(open(os.path.join(out, "fold_0", "nnx_config.json")))
    assert cfg["options"]["epochs"] == 2 and cfg["options_source"] == "NNX_TRAINER_OPTS"

    raw = os.path.join(nnunet_env["nnUNet_raw"], tiny_planned)
    stock_pred = tmp_path / "stock_pred"
    r = run_cli([stock("nnUNetv2_predict"), "-i", os.path.join(raw, "imagesTs"), "-o", str(stock_pred),
                 "-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", "RotNPCTrainer", "-device", "cpu",
                 "--disable_tta", "-npp", "0", "-nps", "0", "--disable_progress_bar"], env=env)
    assert r.returncode == 0, r.stderr[-3000:]

    nnx_pred = tmp_path / "nnx_pred"
    r = run_cli(nnx_cmd("predict", "-i", os.path.join(raw, "imagesTs"), "-o", str(nnx_pred), "-d", str(TINY_ID),
                        "-c", "3d_fullres", "-f", "0", "-tr", "RotNPCTrainer", "-device", "cpu", "--disable_tta",
                        "--quiet"))
    assert r.returncode == 0, r.stderr[-3000:]

    export = tmp_path / "exported"
    r = run_cli(nnx_cmd("export", "-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", "RotNPCTrainer",
                        "-o", str(export)))
    assert r.returncode == 0, r.stderr[-3000:]
    import torch
    ck = torch.load(export / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "nnUNetTrainer" and ck["nnx_trainer_name"] == "RotNPCTrainer"
    assert "nnx_extra" not in ck and ck["optimizer_state"] is None

    exported_pred = tmp_path / "exported_pred"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("NNX_") and k != "nnUNet_extTrainer"}
    import subprocess
    r = subprocess.run([stock("nnUNetv2_predict_from_modelfolder"), "-i", os.path.join(raw, "imagesTs"),
                        "-o", str(exported_pred), "-m", str(export), "-f", "0", "-device", "cpu", "--disable_tta",
                        "-npp", "1", "-nps", "1"],
                       capture_output=True, text=True, env=clean_env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = sorted(f for f in os.listdir(nnx_pred) if f.endswith(".nii.gz"))
    assert cases
    for f in cases:
        a, b, c = read(nnx_pred / f), read(exported_pred / f), read(stock_pred / f)
        assert np.array_equal(a, b), f"exported model differs from nnx_predict on {f}"
        assert np.array_equal(a, c), f"stock nnUNetv2_predict differs from nnx_predict on {f}"
