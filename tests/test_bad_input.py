"""Every command: bad input -> one line naming the file and the problem, non-zero exit, no traceback,
nothing half-written in nnUNet_preprocessed / nnUNet_results."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from conftest import TINY_ID, nnx_cmd, rewrite, run_cli
from nnx.cli import evaluate as nnx_evaluate
from nnx.cli import plan as nnx_plan
from nnx.cli import predict as nnx_predict
from nnx.cli import train as nnx_train

_next_id = iter(range(930, 990))


def one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def bad_copy(tiny_dataset, nnunet_env):
    """A fresh copy of the tiny phantom's raw folder under a new id; yields (id, folder, first case id)."""
    did = next(_next_id)
    src = os.path.join(nnunet_env["nnUNet_raw"], tiny_dataset)
    dst = os.path.join(nnunet_env["nnUNet_raw"], f"Dataset{did:03d}_Broken")
    shutil.copytree(src, dst)
    case = sorted(f for f in os.listdir(os.path.join(dst, "labelsTr")) if f.endswith(".nii.gz"))[0][:-7]
    yield did, dst, case
    shutil.rmtree(dst, ignore_errors=True)


def assert_nothing_preprocessed(nnunet_env, did):
    pp = nnunet_env["nnUNet_preprocessed"]
    assert not [d for d in os.listdir(pp) if d.startswith(f"Dataset{did:03d}")]


# ---------------------------------------------------------------------------------------------- environment
@pytest.mark.parametrize("main,args", [
    (nnx_plan.main, ["-d", "1"]),
    (nnx_train.main, ["1", "3d_fullres", "0"]),
    (nnx_predict.main, ["-i", "x", "-o", "y", "-d", "1", "-c", "3d_fullres"]),
])
def test_env_unset(main, args, monkeypatch, capsys):
    for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(v, raising=False)
    line = one_line_error(capsys, main(args))
    assert "nnUNet_" in line and "export" in line


def test_unknown_dataset(tiny_dataset, capsys):
    line = one_line_error(capsys, nnx_plan.main(["-d", "555"]), "555")
    assert tiny_dataset in line  # lists what is there
    one_line_error(capsys, nnx_plan.main(["-d", "Dataset555_Nope"]), "Dataset555_Nope")


def test_unknown_trainer_and_option(tiny_planned, nnunet_env, capsys):
    results = os.path.join(nnunet_env["nnUNet_results"], tiny_planned)
    before = set(os.listdir(results)) if os.path.isdir(results) else set()
    one_line_error(capsys, nnx_train.main([str(TINY_ID), "3d_fullres", "0", "-tr", "RotNPCTrainr"]),
                   "RotNPCTrainr", "RotNPCTrainer")
    one_line_error(capsys, nnx_train.main([str(TINY_ID), "3d_fullres", "0", "-tr", "RotNPCTrainer", "--opt",
                                           "pretrain_fractoin=0.5"]), "pretrain_fractoin", "pretrain_fraction")
    one_line_error(capsys, nnx_train.main([str(TINY_ID), "3d_fullres", "0", "--opt", "epochs=lots"]),
                   "epochs", "int")
    one_line_error(capsys, nnx_train.main([str(TINY_ID), "3d_foolres", "0"]), "3d_foolres", "3d_fullres")
    after = set(os.listdir(results)) if os.path.isdir(results) else set()
    assert after == before, "a failed nnx_train created a results folder"


def test_unknown_option_via_stock_env(tiny_planned, nnunet_env):
    """Under stock nnUNetv2_train the same validation runs from NNX_TRAINER_OPTS, before any folder exists."""
    from nnx.ext_path import SHIM_DIR
    stock_train = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_train")
    r = run_cli([stock_train, str(TINY_ID), "3d_fullres", "1", "-tr", "RotNPCTrainer", "-device", "cpu"],
                env={"nnUNet_extTrainer": SHIM_DIR, "NNX_TRAINER_OPTS": "epohcs=1"})
    assert r.returncode != 0
    assert "unknown option 'epohcs'" in r.stderr and "NNX_TRAINER_OPTS" in r.stderr
    assert not os.path.exists(os.path.join(nnunet_env["nnUNet_results"], tiny_planned,
                                           "RotNPCTrainer__nnUNetPlans__3d_fullres", "fold_1"))


# ---------------------------------------------------------------------------------------------- dataset.json
def test_missing_dataset_json(bad_copy, nnunet_env, capsys):
    did, folder, _ = bad_copy
    os.remove(os.path.join(folder, "dataset.json"))
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), "dataset.json")
    assert_nothing_preprocessed(nnunet_env, did)


def test_invalid_dataset_json(bad_copy, nnunet_env, capsys):
    did, folder, _ = bad_copy
    with open(os.path.join(folder, "dataset.json"), "a") as f:
        f.write("}{")
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), "dataset.json", "JSON")
    assert_nothing_preprocessed(nnunet_env, did)


def test_dataset_json_missing_key(bad_copy, nnunet_env, capsys):
    did, folder, _ = bad_copy
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    del dj["file_ending"]
    json.dump(dj, open(os.path.join(folder, "dataset.json"), "w"))
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), "dataset.json", "file_ending")
    assert_nothing_preprocessed(nnunet_env, did)


# ---------------------------------------------------------------------------------------------- image files
@pytest.mark.parametrize("what", ["shape", "spacing", "origin", "direction"])
def test_geometry_mismatch(bad_copy, nnunet_env, capsys, what):
    did, folder, case = bad_copy
    lbl = os.path.join(folder, "labelsTr", case + ".nii.gz")

    def change(arr, img):
        if what == "shape":
            return arr[:-1]
        if what == "spacing":
            img.SetSpacing(tuple(s * 1.5 for s in img.GetSpacing()))
        elif what == "origin":
            img.SetOrigin(tuple(o + 7.0 for o in img.GetOrigin()))
        else:
            d = np.array(img.GetDirection()).reshape(3, 3)
            d[:, 0] *= -1
            img.SetDirection(tuple(d.ravel()))
        return img

    rewrite(lbl, change)
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), f"{case}.nii.gz", what)
    assert_nothing_preprocessed(nnunet_env, did)


def test_missing_channel_file(bad_copy, nnunet_env, capsys):
    did, folder, case = bad_copy
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    last = max(int(k) for k in dj["channel_names"])
    os.remove(os.path.join(folder, "imagesTr", f"{case}_{last:04d}.nii.gz"))
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), f"{case}_{last:04d}.nii.gz")
    assert_nothing_preprocessed(nnunet_env, did)


def test_undeclared_label_value(bad_copy, nnunet_env, capsys):
    did, folder, case = bad_copy
    rewrite(os.path.join(folder, "labelsTr", case + ".nii.gz"),
            lambda a, img: np.where(np.arange(a.size).reshape(a.shape) == 5, 17, a).astype(a.dtype))
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), f"{case}.nii.gz", "17")
    assert_nothing_preprocessed(nnunet_env, did)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_voxels(bad_copy, nnunet_env, capsys, bad):
    did, folder, case = bad_copy
    path = os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz")

    def poison(a, img):
        a = a.astype(np.float32)
        a.flat[100:103] = bad
        return a

    rewrite(path, poison)
    line = one_line_error(capsys, nnx_plan.main(["-d", str(did)]), f"{case}_0000.nii.gz")
    assert ("NaN" in line) if np.isnan(bad) else ("inf" in line)
    assert_nothing_preprocessed(nnunet_env, did)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_unreadable_file(bad_copy, nnunet_env, capsys, how):
    did, folder, case = bad_copy
    path = os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] if how == "truncated" else b"not a nifti file at all" * 10)
    one_line_error(capsys, nnx_plan.main(["-d", str(did)]), f"{case}_0000.nii.gz")
    assert_nothing_preprocessed(nnunet_env, did)


# ---------------------------------------------------------------------------------------------- predict/evaluate
def test_predict_bad_inputs(tiny_planned, nnunet_env, tmp_path, capsys):
    # a model must exist for the input checks to be reached: use a fake fold folder is not enough, so check the
    # input folder validation directly through the same function nnx_predict calls
    from nnx import checks
    raw = os.path.join(nnunet_env["nnUNet_raw"], tiny_planned)
    dj = json.load(open(os.path.join(raw, "dataset.json")))
    inp = tmp_path / "in"
    shutil.copytree(os.path.join(raw, "imagesTs"), inp)
    first = sorted(os.listdir(inp))[0]
    path = str(inp / first)
    rewrite(path, lambda a, img: np.full(a.shape, np.nan, np.float32))
    from nnx.errors import NNXError
    with pytest.raises(NNXError) as e:
        checks.check_image_folder(str(inp), dj)
    assert first in str(e.value) and "NaN" in str(e.value)
    # nnx_predict without a trained model says so
    rc = nnx_predict.main(["-i", str(inp), "-o", str(tmp_path / "out"), "-d", str(TINY_ID), "-c", "3d_fullres",
                           "-tr", "nnUNetTrainer", "-p", "NoSuchPlans"])
    one_line_error(capsys, rc)  # no results for this dataset yet, or no model for these plans
    assert not (tmp_path / "out").exists()


def test_evaluate_bad_inputs(tiny_dataset, nnunet_env, tmp_path, capsys):
    raw = os.path.join(nnunet_env["nnUNet_raw"], tiny_dataset)
    one_line_error(capsys, nnx_evaluate.main(["-ref", os.path.join(raw, "labelsTs"), "-pred", str(tmp_path),
                                              "-djfile", str(tmp_path / "dataset.json")]), "dataset.json")
    pred = tmp_path / "pred"
    shutil.copytree(os.path.join(raw, "labelsTs"), pred)
    extra = pred / "not_a_reference_case.nii.gz"
    shutil.copy(next(iter(sorted(pred.iterdir()))), extra)
    one_line_error(capsys, nnx_evaluate.main(["-ref", os.path.join(raw, "labelsTs"), "-pred", str(pred),
                                              "-d", str(TINY_ID)]), "not_a_reference_case")
    assert not (pred / "summary.json").exists()


def test_cli_subprocess_exit_code_and_no_traceback(nnunet_env):
    r = run_cli(nnx_cmd("plan", "-d", "777"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(nnx_cmd("plan", "-d", "777", "--debug"))
    assert r.returncode == 2 and "Traceback" in r.stderr
