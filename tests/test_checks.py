"""Tests for nnx.checks: a tiny valid dataset, broken one way per test."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnx import checks
from nnx.errors import NNXError

SPACING = (1.0, 1.0, 2.0)  # ITK order (x, y, z)
ORIGIN = (10.0, -5.0, 3.5)
SHAPE = (8, 16, 16)  # numpy order (z, y, x)
FE = ".nii.gz"
NAME = "Dataset042_Tiny"
CASES = ["case_000", "case_001", "case_002"]


def write(path, arr, spacing=SPACING, origin=ORIGIN, direction=None):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)


def make_dataset(root, name=NAME, cases=CASES, shape=SHAPE, labels=None, seed=0):
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for c in cases:
        for ch in range(2):
            write(folder / "imagesTr" / f"{c}_{ch:04d}{FE}", rng.normal(size=shape).astype(np.float32))
        seg = np.zeros(shape, np.uint8)
        seg[2:5, 4:10, 4:10] = 1
        seg[5:7, 8:12, 2:6] = 2
        write(folder / "labelsTr" / f"{c}{FE}", seg)
    dj = {"channel_names": {"0": "CT", "1": "T2"},
          "labels": labels or {"background": 0, "liver": 1, "tumor": 2},
          "numTraining": len(cases), "file_ending": FE, "name": name}
    (folder / "dataset.json").write_text(json.dumps(dj, indent=2))
    return folder


@pytest.fixture
def ds(tmp_path):
    return make_dataset(tmp_path / "nnUNet_raw")


def set_json(folder, **changes):
    dj = json.loads((folder / "dataset.json").read_text())
    for k, v in changes.items():
        if v is None:
            dj.pop(k, None)
        else:
            dj[k] = v
    (folder / "dataset.json").write_text(json.dumps(dj))


def err(fn, *args, **kwargs) -> str:
    with pytest.raises(NNXError) as ei:
        fn(*args, **kwargs)
    s = str(ei.value)
    assert "\n" not in s and s.strip() == s, s
    return s


def assert_msg(msg, *words):
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


# ---------------------------------------------------------------------------------------------------- valid dataset
def test_valid_dataset_passes(ds):
    summary = checks.check_raw_dataset(str(ds))
    assert summary["cases"] == 3 and summary["case_ids"] == CASES
    assert summary["channels"] == 2
    assert summary["labels"] == [0, 1, 2] and summary["label_values_found"] == [0, 1, 2]
    assert summary["time"] < 2.0
    assert checks.check_raw_dataset(str(ds), check_all_cases=False)["fully_read_cases"] == 1


def test_valid_dataset_with_pool(ds):
    assert checks.check_raw_dataset(str(ds), num_processes=2)["cases"] == 3


def test_stock_verify_dataset_integrity_accepts_valid(ds):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(ds), num_processes=1)  # raises on problems


def test_timing_8_cases(tmp_path):
    folder = make_dataset(tmp_path, cases=[f"c{i:03d}" for i in range(8)], shape=(32, 64, 64))
    summary = checks.check_raw_dataset(str(folder))
    assert summary["cases"] == 8
    assert summary["time"] < 2.0, summary["time"]


def test_read_image_geometry(ds):
    arr, geom = checks.read_image(str(ds / "imagesTr" / f"case_000_0000{FE}"))
    assert arr.shape == SHAPE and geom.shape == SHAPE[::-1]
    assert geom.spacing == SPACING and geom.origin == ORIGIN
    assert geom.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert checks.read_geometry(str(ds / "labelsTr" / f"case_000{FE}")) == geom


def test_extra_nnx_keys_and_folders_are_ignored(ds):
    set_json(ds, nnx={"format_version": 1, "tiers": {c: "expert" for c in CASES}})
    (ds / "coarseTr").mkdir()
    (ds / "imagesTs").mkdir()
    assert checks.check_raw_dataset(str(ds))["cases"] == 3


# ---------------------------------------------------------------------------------------------------- environment
def test_env_vars_unset(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    monkeypatch.setenv("nnUNet_results", "")
    monkeypatch.setenv("nnUNet_preprocessed", "/tmp/pp")
    msg = err(checks.require_env, "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    assert_msg(msg, "nnUNet_raw", "nnUNet_results", "not set", "export nnUNet_raw=")
    assert "nnUNet_preprocessed" not in msg
    assert checks.require_env("preprocessed") == {"nnUNet_preprocessed": "/tmp/pp"}


# ---------------------------------------------------------------------------------------------------- dataset names
@pytest.fixture
def env(tmp_path, monkeypatch):
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / n).mkdir(exist_ok=True)
        monkeypatch.setenv(n, str(tmp_path / n))
    make_dataset(tmp_path / "nnUNet_raw")
    (tmp_path / "nnUNet_raw" / "Dataset001_Other").mkdir()
    return tmp_path


def test_resolve_dataset_ok(env):
    for arg in (42, "42", "042", NAME, NAME + "/"):
        assert checks.resolve_dataset(arg) == NAME
    assert checks.resolve_dataset(1, where=("raw",)) == "Dataset001_Other"


def test_resolve_unknown_dataset_lists_available(env):
    msg = err(checks.resolve_dataset, 7)
    assert_msg(msg, "dataset id 7", "not found", "nnUNet_raw=", "available", NAME, "Dataset001_Other")
    msg = err(checks.resolve_dataset, "Dataset042_Wrong")
    assert_msg(msg, "Dataset042_Wrong", "not found", "did you mean", NAME)


def test_resolve_ambiguous_and_malformed(env):
    (env / "nnUNet_results" / "Dataset042_Clash").mkdir()
    assert_msg(err(checks.resolve_dataset, 42), "ambiguous", NAME, "Dataset042_Clash")
    for bad in ("Dataset4_Foo", "Task004_X", "1234", "abc", ""):
        assert_msg(err(checks.resolve_dataset, bad), "malformed")


def test_resolve_no_env(monkeypatch):
    for n in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(n, raising=False)
    assert_msg(err(checks.resolve_dataset, 4, where="raw"), "nnUNet_raw", "export")


# ---------------------------------------------------------------------------------------------------- dataset.json
def test_missing_dataset_json(ds):
    (ds / "dataset.json").unlink()
    assert_msg(err(checks.check_raw_dataset, str(ds)), "dataset.json", "missing")


def test_invalid_json(ds):
    (ds / "dataset.json").write_text('{\n  "labels": {"background": 0,}\n}')
    assert_msg(err(checks.load_dataset_json, str(ds)), "dataset.json", "invalid JSON", "line 2", "column")


def test_missing_required_key(ds):
    set_json(ds, numTraining=None)
    assert_msg(err(checks.check_raw_dataset, str(ds)), "dataset.json", "missing required key", "numTraining")
    set_json(ds, numTraining=3, channel_names=None)
    assert_msg(err(checks.check_raw_dataset, str(ds)), "dataset.json", "channel_names")


def test_legacy_modality_key_accepted(ds):
    set_json(ds, channel_names=None, modality={"0": "CT", "1": "T2"})
    assert checks.check_raw_dataset(str(ds))["channels"] == 2


def test_non_consecutive_labels(ds):
    set_json(ds, labels={"background": 0, "liver": 1, "tumor": 3})
    assert_msg(err(checks.check_raw_dataset, str(ds)), "dataset.json", "consecutive", "missing [2]")


@pytest.mark.parametrize("labels, words", [
    ({"liver": 1}, ["background"]),
    ({"background": 1, "liver": 0}, ["background", "0"]),
    ({"background": 0, "liver": 1, "tumor": 2, "ignore": 5}, ["ignore", "3"]),
    ({"background": 0, "whole": [1, 2], "core": 2}, ["regions_class_order"]),
    ({"background": 0, "liver": "1"}, ["integer"]),
])
def test_bad_labels(ds, labels, words):
    set_json(ds, labels=labels)
    assert_msg(err(checks.load_dataset_json, str(ds)), "dataset.json", *words)


def test_regions_and_ignore_accepted(ds):
    set_json(ds, labels={"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, regions_class_order=[1, 2])
    assert checks.check_raw_dataset(str(ds))["labels"] == [0, 1, 2, 3]


def test_num_training_mismatch(ds):
    set_json(ds, numTraining=5)
    assert_msg(err(checks.check_raw_dataset, str(ds)), "dataset.json", "numTraining is 5", "imagesTr has 3 cases")


# ---------------------------------------------------------------------------------------------------- files / geometry
@pytest.mark.parametrize("field, kwargs, words", [
    ("shape", {"arr": np.zeros((8, 16, 15), np.uint8)}, ["(15, 16, 8)", "(16, 16, 8)"]),
    ("spacing", {"spacing": (1.0, 1.0, 2.5)}, ["(1.0, 1.0, 2.5)", "image spacing (1.0, 1.0, 2.0)"]),
    ("origin", {"origin": (10.0, -5.0, 13.5)}, ["(10.0, -5.0, 13.5)", "image origin (10.0, -5.0, 3.5)"]),
    ("direction", {"direction": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)}, ["image direction"]),
])
def test_label_geometry_mismatch(ds, field, kwargs, words):
    arr = kwargs.pop("arr", np.zeros(SHAPE, np.uint8))
    write(ds / "labelsTr" / f"case_001{FE}", arr, **kwargs)
    msg = err(checks.check_raw_dataset, str(ds))
    assert_msg(msg, f"labelsTr/case_001{FE}", f"{field} ", "!=", f"case_001_0000{FE}", *words)


def test_channel_geometry_mismatch(ds):
    write(ds / "imagesTr" / f"case_002_0001{FE}", np.zeros(SHAPE, np.float32), spacing=(1.0, 1.0, 3.0))
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_002_0001{FE}", "spacing (1.0, 1.0, 3.0) != image spacing")


def test_header_only_mode_still_checks_geometry(ds):
    write(ds / "labelsTr" / f"case_002{FE}", np.zeros(SHAPE, np.uint8), spacing=(1.0, 1.0, 2.5))
    assert_msg(err(checks.check_raw_dataset, str(ds), check_all_cases=False), f"case_002{FE}", "spacing")


def test_missing_channel_file(ds):
    (ds / "imagesTr" / f"case_001_0001{FE}").unlink()
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"imagesTr/case_001_0001{FE}", "missing channel file")


def test_missing_label_file_and_orphan_label(ds):
    (ds / "labelsTr" / f"case_001{FE}").unlink()
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"labelsTr/case_001{FE}", "missing label file")
    shutil.copy(ds / "labelsTr" / f"case_000{FE}", ds / "labelsTr" / f"case_001{FE}")
    shutil.copy(ds / "labelsTr" / f"case_000{FE}", ds / "labelsTr" / f"case_009{FE}")
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"labelsTr/case_009{FE}", "no image")


def test_bad_file_names(ds):
    shutil.copy(ds / "imagesTr" / f"case_000_0000{FE}", ds / "imagesTr" / "case_003_0000.nii")
    assert_msg(err(checks.check_raw_dataset, str(ds)), "case_003_0000.nii", "file_ending")
    os.rename(ds / "imagesTr" / "case_003_0000.nii", ds / "imagesTr" / f"case_003{FE}")
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_003{FE}", "naming")
    os.rename(ds / "imagesTr" / f"case_003{FE}", ds / "imagesTr" / f"case_000_0002{FE}")
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_000_0002{FE}", "unexpected channel")


def test_label_values_not_declared(ds):
    seg = np.zeros(SHAPE, np.uint8)
    seg[0, 0, :3] = 7
    write(ds / "labelsTr" / f"case_002{FE}", seg)
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_002{FE}", "label values [7] not declared",
               "{0, 1, 2}")


def test_ignore_label_value_allowed(ds):
    set_json(ds, labels={"background": 0, "liver": 1, "tumor": 2, "ignore": 3})
    seg = np.full(SHAPE, 3, np.uint8)
    seg[:2] = 1
    write(ds / "labelsTr" / f"case_002{FE}", seg)
    assert checks.check_raw_dataset(str(ds))["label_values_found"] == [0, 1, 2, 3]


def test_non_integer_float_label(ds):
    seg = np.zeros(SHAPE, np.float32)
    seg[1, 1, 1] = 0.5
    write(ds / "labelsTr" / f"case_000{FE}", seg)
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_000{FE}", "non-integer")
    write(ds / "labelsTr" / f"case_000{FE}", np.ones(SHAPE, np.float32))  # integer-valued float is fine
    checks.check_raw_dataset(str(ds))


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_nonfinite_voxels(ds, value, word):
    arr = np.zeros(SHAPE, np.float32)
    arr[0, 0, :5] = value
    write(ds / "imagesTr" / f"case_001_0001{FE}", arr)
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_001_0001{FE}", f"5 {word} voxels")


def test_truncated_nii_gz(ds):
    p = ds / "imagesTr" / f"case_002_0000{FE}"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"case_002_0000{FE}", "truncated")
    assert_msg(err(checks.read_image, str(p)), "truncated")


def test_truncated_uncompressed_nii(tmp_path):
    p = tmp_path / "x.nii"
    write(p, np.ones(SHAPE, np.float32))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_msg(err(checks.read_image, str(p)), "x.nii", "truncated")


def test_unreadable_garbage(ds):
    (ds / "labelsTr" / f"case_001{FE}").write_bytes(os.urandom(3000))
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"labelsTr/case_001{FE}", "unreadable")
    (ds / "labelsTr" / f"case_001{FE}").write_bytes(b"")
    assert_msg(err(checks.check_raw_dataset, str(ds)), f"labelsTr/case_001{FE}", "unreadable", "empty")


def test_error_from_pool_is_reported(ds):
    write(ds / "labelsTr" / f"case_002{FE}", np.zeros(SHAPE, np.uint8), origin=(0.0, 0.0, 0.0))
    assert_msg(err(checks.check_raw_dataset, str(ds), num_processes=2), f"case_002{FE}", "origin")


def test_dataset_key_layout(ds):
    entries = {c: {"images": [f"imagesTr/{c}_0000{FE}", f"imagesTr/{c}_0001{FE}"], "label": f"labelsTr/{c}{FE}"}
               for c in CASES[:2]}
    set_json(ds, dataset=entries, numTraining=2)
    assert checks.check_raw_dataset(str(ds))["case_ids"] == CASES[:2]
    entries["case_001"]["label"] = "labelsTr/nope.nii.gz"
    set_json(ds, dataset=entries)
    assert_msg(err(checks.check_raw_dataset, str(ds)), "nope.nii.gz", "missing label file")


# ---------------------------------------------------------------------------------------------------- prediction input
def test_image_folder(ds, tmp_path):
    dj = checks.load_dataset_json(str(ds))
    inp = tmp_path / "input"
    shutil.copytree(ds / "imagesTr", inp)
    assert checks.check_image_folder(str(inp), dj) == CASES
    (inp / f"case_001_0001{FE}").unlink()
    assert_msg(err(checks.check_image_folder, str(inp), dj), f"case_001_0001{FE}", "missing channel file")
    shutil.copy(inp / f"case_001_0000{FE}", inp / f"case_001_0001{FE}")
    (inp / "notes.txt").write_text("x")
    assert_msg(err(checks.check_image_folder, str(inp), dj), "notes.txt", "file_ending")
    (inp / "notes.txt").unlink()
    write(inp / f"case_000_0001{FE}", np.zeros(SHAPE, np.float32), origin=(0.0, 0.0, 0.0))
    assert_msg(err(checks.check_image_folder, str(inp), str(ds)), f"case_000_0001{FE}", "origin", "channel 0")


def test_image_folder_missing_or_empty(ds, tmp_path):
    dj = checks.load_dataset_json(str(ds))
    assert_msg(err(checks.check_image_folder, str(tmp_path / "nope"), dj), "nope", "prediction input", "not found")
    (tmp_path / "empty").mkdir()
    assert_msg(err(checks.check_image_folder, str(tmp_path / "empty"), dj), "empty", "is empty")


# ---------------------------------------------------------------------------------------------------- evaluation input
def test_prediction_folder(ds, tmp_path):
    labels = {"background": 0, "liver": 1, "tumor": 2}
    ref, pred = ds / "labelsTr", tmp_path / "pred"
    shutil.copytree(ref, pred)
    (pred / "plans.json").write_text("{}")  # non-prediction files are ignored
    assert checks.check_prediction_folder(str(ref), str(pred), FE, labels) == [f"{c}{FE}" for c in CASES]
    shutil.copy(pred / f"case_000{FE}", pred / f"case_077{FE}")
    assert_msg(err(checks.check_prediction_folder, str(ref), str(pred), FE, labels),
               f"labelsTr/case_077{FE}", "reference file missing", f"pred/case_077{FE}")
    (pred / f"case_077{FE}").unlink()
    write(pred / f"case_001{FE}", np.zeros(SHAPE, np.uint8), spacing=(2.0, 1.0, 2.0))
    assert_msg(err(checks.check_prediction_folder, str(ref), str(pred), FE, labels),
               f"pred/case_001{FE}", "spacing (2.0, 1.0, 2.0) != reference spacing (1.0, 1.0, 2.0)")
    write(pred / f"case_001{FE}", np.full(SHAPE, 4, np.uint8))
    assert_msg(err(checks.check_prediction_folder, str(ref), str(pred), FE, labels),
               f"pred/case_001{FE}", "prediction values [4] not declared")
    assert_msg(err(checks.check_prediction_folder, str(tmp_path / "noref"), str(pred), FE, labels),
               "noref", "reference folder not found")


def test_float32_header_noise_is_tolerated(ds):
    write(ds / "labelsTr" / f"case_001{FE}", np.zeros(SHAPE, np.uint8), origin=(10.00001, -5.0, 3.50001),
          spacing=(1.0, 1.0, 2.000001))
    checks.check_raw_dataset(str(ds))


def test_non_orthonormal_nifti_falls_back_to_nibabel(tmp_path):
    import nibabel as nib
    aff = np.array([[1.0, 0.3, 0, 5], [0, 1.0, 0, 6], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    data = np.zeros((6, 5, 4), np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "shear.nii.gz"))
    arr, geom = checks.read_image(str(tmp_path / "shear.nii.gz"))
    assert arr.shape == (4, 5, 6) and geom.shape == (6, 5, 4) and geom.origin == (-5.0, -6.0, 7.0)
    assert_msg(err(checks._check_finite, str(tmp_path / "shear.nii.gz"), arr), "1 NaN voxel")
