"""Tests for the validation of dataset.json's ``nnx`` block (annotation tiers and auxiliary inputs).

One valid phantom per module (every tier, anatomy maps, PET as a train-only channel, test cases with coarse and
anatomy inputs); each test copies it and breaks it one way.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import nnx_cmd, rewrite, run_cli
from nnx import checks
from nnx.errors import NNXError

DATASET_ID = 990
CLI_ID = 991
FE = ".nii.gz"
TIERS = "expert=0.5,coarse=0.2,scribble=0.2,none=0.1"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """The valid phantom (raw folder path); nnUNet_raw points to a module temp dir only while it is written."""
    from nnx.synth import make_dataset
    raw = tmp_path_factory.mktemp("tier_raw")
    old = os.environ.get("nnUNet_raw")
    os.environ["nnUNet_raw"] = str(raw)
    try:
        report = make_dataset(DATASET_ID, name="TierChecks", preset="tiny", seed=0, tiers=TIERS, pet="train_only",
                              num_train=10, num_test=2)
    finally:
        if old is None:
            os.environ.pop("nnUNet_raw", None)
        else:
            os.environ["nnUNet_raw"] = old
    folder = report.folder
    dj = load_json(folder)
    block = dj["nnx"]
    present = set(block["tiers"].values())
    assert present == {"expert", "coarse", "scribble", "none"}, present
    assert "ignore" in dj["labels"] and block["scribbles"]["ignore_value"] == dj["labels"]["ignore"]
    assert set(block["aux_maps"]) == {"anatomy"} and "train_only_channels" in block
    assert os.listdir(os.path.join(folder, "imagesTs"))
    return folder


@pytest.fixture
def ds(valid, tmp_path):
    """A fresh copy of the valid phantom, to break."""
    dst = tmp_path / os.path.basename(valid)
    shutil.copytree(valid, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------- helpers
def load_json(folder):
    with open(os.path.join(folder, "dataset.json")) as f:
        return json.load(f)


def save_json(folder, dj):
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f, indent=1)


def cases_of(folder, tier):
    return sorted(c for c, t in load_json(folder)["nnx"]["tiers"].items() if t == tier)


def ts_cases(folder):
    return sorted(n[: -len("_0000" + FE)] for n in os.listdir(os.path.join(folder, "imagesTs")))


def p(folder, *parts):
    return os.path.join(folder, *parts)


def set_voxel(value, index=5):
    def fn(a, img):
        a = a.copy()
        a.flat[index] = value
        return a
    return fn


def error(folder, **kwargs) -> NNXError:
    with pytest.raises(NNXError) as ei:
        checks.check_raw_dataset(folder, **kwargs)
    e = ei.value
    s = str(e)
    assert "\n" not in s and s.strip() == s, s
    assert e.message and e.message[0].islower(), e.message
    return e


def expect(folder, path, *words, **kwargs) -> NNXError:
    e = error(folder, **kwargs)
    assert os.path.normpath(e.path) == os.path.normpath(path), (e.path, path, e.message)
    for w in words:
        assert w in e.message, f"{w!r} not in {e.message!r}"
    return e


# ---------------------------------------------------------------------------------------------------- valid dataset
def test_valid_dataset_passes(valid):
    dj = load_json(valid)
    block = dj["nnx"]
    tiers = block["tiers"]
    n_train = len(tiers)
    n_labeled = sum(t != "none" for t in tiers.values())
    n_test = len(ts_cases(valid))
    summary = checks.check_raw_dataset(valid)
    assert summary["cases"] == n_labeled == dj["numTraining"]
    assert summary["nnx"] == {
        "tiers": {t: sum(v == t for v in tiers.values()) for t in ("expert", "coarse", "scribble", "none")},
        # the phantom writes coarse masks and anatomy maps for every training case, scribbles for every labelled one
        "entries": {"coarse": n_train, "scribbles": n_labeled, "anatomy": n_train, "train_only": n_train},
        "unlabeled": sum(t == "none" for t in tiers.values()),
        "test_inputs": {"coarse": n_test, "anatomy": n_test},
    }
    assert summary["label_values_found"] == list(range(dj["labels"]["ignore"] + 1))
    # the standalone form and the header-only mode agree
    cases = checks._training_cases(valid, dj)
    assert checks.check_nnx_block(valid, dj, cases) == summary["nnx"]
    fast = checks.check_raw_dataset(valid, check_all_cases=False)
    assert fast["nnx"] == summary["nnx"] and fast["fully_read_cases"] == 1


def test_valid_dataset_with_pool(valid):
    assert checks.check_raw_dataset(valid, num_processes=2)["nnx"]["unlabeled"] == 1


def test_optional_inputs_may_be_absent(ds):
    """Train-only channels are optional for tier none cases; coarse masks and scribbles for every case."""
    none = cases_of(ds, "none")[0]
    expert = cases_of(ds, "expert")[0]
    os.remove(p(ds, "trainOnlyTr", f"{none}_0000{FE}"))
    os.remove(p(ds, "coarseTr", expert + FE))
    os.remove(p(ds, "scribblesTr", expert + FE))
    summary = checks.check_raw_dataset(ds)["nnx"]
    assert summary["entries"]["train_only"] == len(load_json(ds)["nnx"]["tiers"]) - 1


# ---------------------------------------------------------------------------------------------------- declarations
def test_missing_tier(ds):
    dj = load_json(ds)
    case = cases_of(ds, "expert")[0]
    del dj["nnx"]["tiers"][case]
    save_json(ds, dj)
    expect(ds, p(ds, "dataset.json"), case, "no tier", "nnx.tiers")


def test_unknown_tier(ds):
    dj = load_json(ds)
    case = cases_of(ds, "expert")[0]
    dj["nnx"]["tiers"][case] = "gold"
    save_json(ds, dj)
    expect(ds, p(ds, "dataset.json"), case, "'gold'", "expert|coarse|scribble|none")


def test_none_case_with_label_file(ds):
    case = cases_of(ds, "none")[0]
    shutil.copy(p(ds, "truthTr", case + FE), p(ds, "labelsTr", case + FE))
    expect(ds, p(ds, "labelsTr", case + FE), "unlabeled (tier none) case has a label file", case)


def test_none_case_missing_unlabeled_image(ds):
    case = cases_of(ds, "none")[0]
    path = p(ds, "imagesUnlabeledTr", f"{case}_0000{FE}")
    os.remove(path)
    expect(ds, path, "missing images", "tier none", case)


def test_undeclared_case_in_unlabeled_folder(ds):
    path = p(ds, "imagesUnlabeledTr", f"case_998_0000{FE}")
    shutil.copy(p(ds, "imagesUnlabeledTr", f"{cases_of(ds, 'none')[0]}_0000{FE}"), path)
    expect(ds, path, "'case_998'", "no tier", "only tier none")


def test_tier_case_without_images(ds):
    dj = load_json(ds)
    dj["nnx"]["tiers"]["case_997"] = "coarse"
    save_json(ds, dj)
    expect(ds, p(ds, "imagesTr", f"case_997_0000{FE}"), "'case_997'", "no images")


def test_scribbles_ignore_value_differs_from_labels(ds):
    dj = load_json(ds)
    dj["nnx"]["scribbles"]["ignore_value"] = 9
    save_json(ds, dj)
    expect(ds, p(ds, "dataset.json"), "nnx.scribbles.ignore_value is 9", "ignore is 7")


def test_scribble_tier_needs_ignore_label(ds):
    dj = load_json(ds)
    del dj["labels"]["ignore"]
    save_json(ds, dj)
    expect(ds, p(ds, "dataset.json"), "scribble-tier", "\"ignore\"")


# ---------------------------------------------------------------------------------------------------- coarse masks
@pytest.mark.parametrize("what", ["spacing", "shape"])
def test_coarse_mask_wrong_geometry(ds, what):
    case = cases_of(ds, "expert")[0]
    path = p(ds, "coarseTr", case + FE)

    def change(a, img):
        if what == "shape":
            return a[:-1]
        img.SetSpacing(tuple(s * 1.5 for s in img.GetSpacing()))
        return img

    rewrite(path, change)
    expect(ds, path, f"coarse mask {what}", f"{case}_0000{FE}")


def test_coarse_mask_undeclared_value(ds):
    case = cases_of(ds, "coarse")[0]
    path = p(ds, "coarseTr", case + FE)
    rewrite(path, set_voxel(9))
    expect(ds, path, "coarse mask values [9] not declared in the task's labels {0, 1, 2, 3, 4, 5, 6}")


@pytest.mark.parametrize("where", ["coarseTr", "labelsTr"])
def test_coarse_mask_contains_ignore(ds, where):
    ignore = load_json(ds)["labels"]["ignore"]
    case = cases_of(ds, "coarse")[0]
    path = p(ds, where, case + FE)
    rewrite(path, set_voxel(ignore))
    what = "coarse mask" if where == "coarseTr" else "coarse-tier label"
    expect(ds, path, f"{what} contains the ignore value {ignore} (1 voxel)")


def test_coarse_test_mask_missing(ds):
    case = ts_cases(ds)[0]
    path = p(ds, "coarseTs", case + FE)
    os.remove(path)
    expect(ds, path, "missing coarse mask of test case", case, "inference input")


@pytest.mark.parametrize("name", ["case_999" + FE, "notes.txt"])
def test_stray_file_in_coarse_folder(ds, name):
    path = p(ds, "coarseTr", name)
    shutil.copy(p(ds, "coarseTr", cases_of(ds, "expert")[0] + FE), path)
    e = expect(ds, path)
    assert ("unknown case 'case_999'" in e.message) if name.endswith(FE) else ("file_ending" in e.message), e.message


# ---------------------------------------------------------------------------------------------------- scribbles
def test_scribble_tier_label_without_ignore_is_dense(ds):
    case = cases_of(ds, "scribble")[0]
    path = p(ds, "labelsTr", case + FE)
    shutil.copy(p(ds, "truthTr", case + FE), path)
    expect(ds, path, "scribble-tier label has no ignore voxels", "dense")


def test_scribbles_file_without_ignore(ds):
    case = cases_of(ds, "expert")[0]
    path = p(ds, "scribblesTr", case + FE)
    shutil.copy(p(ds, "truthTr", case + FE), path)
    expect(ds, path, "scribble label has no ignore voxels")


# ---------------------------------------------------------------------------------------------------- aux maps
def test_aux_map_undeclared_value(ds):
    case = cases_of(ds, "scribble")[0]
    path = p(ds, "anatomyTr", case + FE)
    rewrite(path, set_voxel(6))
    expect(ds, path, "anatomy map values [6] not declared in nnx.aux_maps.anatomy.labels")


@pytest.mark.parametrize("tier", ["expert", "none"])
def test_aux_map_missing(ds, tier):
    case = cases_of(ds, tier)[0]
    path = p(ds, "anatomyTr", case + FE)
    os.remove(path)
    expect(ds, path, "missing anatomy map", case)


# ---------------------------------------------------------------------------------------------------- train-only
def test_train_only_channel_missing(ds):
    case = cases_of(ds, "coarse")[0]
    path = p(ds, "trainOnlyTr", f"{case}_0000{FE}")
    os.remove(path)
    expect(ds, path, "missing train-only channel", case)


def test_train_only_channel_nan(ds):
    case = cases_of(ds, "expert")[-1]
    path = p(ds, "trainOnlyTr", f"{case}_0000{FE}")

    def poison(a, img):
        a = a.astype(np.float32)
        a.flat[10:13] = np.nan
        return a

    rewrite(path, poison)
    expect(ds, path, "train-only channel contains 3 NaN voxels")


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_plan_reports_one_line(valid, tmp_path):
    root = tmp_path / "nnunet"
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results")}
    for v in env.values():
        os.makedirs(v)
    folder = os.path.join(env["nnUNet_raw"], f"Dataset{CLI_ID:03d}_TierBad")
    shutil.copytree(valid, folder)
    bad = p(folder, "coarseTr", cases_of(folder, "coarse")[0] + FE)
    rewrite(bad, set_voxel(9))
    r = run_cli(nnx_cmd("plan", "-d", str(CLI_ID), "-c", "3d_fullres", "--no-preprocess"), env=env, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert os.path.basename(bad) in lines[0] and "coarse mask values [9]" in lines[0], lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    assert not any(n.startswith(f"Dataset{CLI_ID:03d}_") for n in os.listdir(env["nnUNet_preprocessed"]))
