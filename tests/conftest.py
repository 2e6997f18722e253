"""Shared fixtures: one tiny phantom, planned and preprocessed once per test session.

Every test runs with its own nnUNet_* folders under a session temp dir; nothing touches the user's environment.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

TINY_ID = 901
TIERED_ID = 902       # every annotation tier + PET as a train-only channel
TIERED_PLAIN_ID = 903  # the same images and labelsTr as a plain nnU-Net dataset (no nnx block, no extra folders)
TIERS = "expert=0.5,coarse=0.2,scribble=0.2,none=0.1"

# before anything imports nnunetv2 (it reads these at import time): one worker process, no torch.compile
os.environ["nnUNet_def_n_proc"] = "1"
os.environ["nnUNet_compile"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """Session-wide nnUNet_raw/_preprocessed/_results in a temp dir (also exported to os.environ)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "0",
           "NNX_HOME": str(root / "nnx_home"),  # calibration / profile cache: never the user's ~/.nnx
           # nnx_plan's fingerprints sample 1e6 foreground voxels, not nnU-Net's 1e8 (~3 s instead of ~30 s each)
           "NNX_FINGERPRINT_SAMPLES": "1000000"}
    for v in env.values():
        if os.sep in v:
            os.makedirs(v, exist_ok=True)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ.pop("nnUNet_extTrainer", None)
    os.environ.pop("NNX_TRAINER_OPTS", None)
    os.environ.pop("NNX_TRAINER_OPTS_SOURCE", None)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_dataset(nnunet_env):
    """The tiny phantom (raw only). Returns its dataset name."""
    from nnx.synth import make_dataset
    report = make_dataset(TINY_ID, preset="tiny", seed=0)
    return os.path.basename(report.folder)


@pytest.fixture(scope="session")
def tiny_planned(tiny_dataset):
    """The tiny phantom planned and preprocessed (3d_fullres) through nnx_plan."""
    from nnx.cli.plan import main
    assert main(["-d", str(TINY_ID), "-c", "3d_fullres", "-np", "1"]) == 0
    return tiny_dataset


@pytest.fixture(scope="session")
def tiered_planned(nnunet_env):
    """A tiny phantom with expert, coarse, scribble and unlabeled cases, anatomy maps and a train-only PET
    channel, planned and preprocessed (3d_fullres) through nnx_plan. Returns its dataset name."""
    from nnx.cli.plan import main
    from nnx.synth import make_dataset
    report = make_dataset(TIERED_ID, preset="tiny", seed=3, tiers=TIERS, pet="train_only")
    assert main(["-d", str(TIERED_ID), "-c", "3d_fullres", "-np", "1"]) == 0
    return os.path.basename(report.folder)


def rewrite(path, fn):
    """Read image ``path``, apply ``fn(arr, img)`` -> an array (written back with the original geometry) or an
    image (written as is): the one way tests break a file."""
    import numpy as np
    import SimpleITK as sitk
    img = sitk.ReadImage(str(path))
    out = fn(sitk.GetArrayFromImage(img), img)
    if isinstance(out, np.ndarray):
        new = sitk.GetImageFromArray(out)
        new.SetSpacing(img.GetSpacing())
        new.SetOrigin(img.GetOrigin())
        new.SetDirection(img.GetDirection())
        out = new
    sitk.WriteImage(out, str(path), True)


def run_cli(args, env=None, timeout=600):
    """Run a console command in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout)


def nnx_cmd(module: str, *args: str):
    """``python -m nnx.cli.<module> args`` (same code as the console script, no PATH assumptions)."""
    return [sys.executable, "-m", f"nnx.cli.{module}", *args]


def make_fingerprint_dataset(did: int, name: str, n_cases=40, spacing=(2.5, 0.8, 0.8), shape=(160, 400, 400),
                             n_labels=3, channel="CT") -> str:
    """A dataset that exists only as dataset.json + dataset_fingerprint.json (no images): enough for nnU-Net's
    planners, so planning can be tested at realistic sizes in seconds. Needs nnUNet_raw/_preprocessed set."""
    import json
    full = f"Dataset{did:03d}_{name}"
    raw = os.path.join(os.environ["nnUNet_raw"], full)
    pp = os.path.join(os.environ["nnUNet_preprocessed"], full)
    for d in (os.path.join(raw, "imagesTr"), os.path.join(raw, "labelsTr"), pp):
        os.makedirs(d, exist_ok=True)
    dj = {"channel_names": {"0": channel}, "labels": {"background": 0, **{f"c{i}": i for i in range(1, n_labels + 1)}},
          "numTraining": n_cases, "file_ending": ".nii.gz", "overwrite_image_reader_writer": "SimpleITKIO",
          "name": name, "dataset": {"case_000": {"images": ["imagesTr/case_000_0000.nii.gz"],
                                                 "label": "labelsTr/case_000.nii.gz"}}}
    fg = {"0": {"max": 1000.0, "mean": 100.0, "median": 90.0, "min": -1000.0, "percentile_00_5": -900.0,
                "percentile_99_5": 900.0, "std": 200.0}}
    fp = {"foreground_intensity_properties_per_channel": fg, "median_relative_size_after_cropping": 1.0,
          "shapes_after_crop": [list(shape)] * n_cases, "spacings": [list(spacing)] * n_cases}
    for path, obj in ((os.path.join(raw, "dataset.json"), dj), (os.path.join(pp, "dataset.json"), dj),
                      (os.path.join(pp, "dataset_fingerprint.json"), fp)):
        with open(path, "w") as f:
            json.dump(obj, f)
    return full
