"""nnx_evaluate with CC-Metrics: summary.json schema, CSV, units, ignore label, reference parity, bad input."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import nnx_cmd, run_cli

FE = ".nii.gz"


def write(path, arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.SetSpacing(spacing)  # ITK order x, y, z
    sitk.WriteImage(img, str(path))


def cube(shape, lo, hi):
    a = np.zeros(shape, bool)
    a[lo:hi, lo:hi, lo:hi] = True
    return a


@pytest.fixture
def folders(tmp_path):
    """Two cases of the spec's hand-computed example: reference lesions A = [4:10]^3 (216 voxels) and
    B = [24:26]^3 (8 voxels); case_a predicts A only, case_b predicts A, B and a false positive [28:30]^3."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    s = (32, 32, 32)
    a, b, fp = cube(s, 4, 10), cube(s, 24, 26), cube(s, 28, 30)
    for case, p in (("case_a", a), ("case_b", a | b | fp)):
        write(ref / f"{case}{FE}", a | b)
        write(pred / f"{case}{FE}", p)
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 2,
          "file_ending": FE}
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    return tmp_path


def test_summary_has_cc_metrics_where_nnunet_puts_dice(folders):
    out = folders / "eval" / "summary.json"
    r = run_cli(nnx_cmd("evaluate", "-ref", str(folders / "ref"), "-pred", str(folders / "pred"),
                        "-djfile", str(folders / "dataset.json"), "-o", str(out), "--plot", "-np", "1"))
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(out.read_text())
    per_case = {os.path.basename(e["prediction_file"]): e["metrics"]["1"] for e in s["metric_per_case"]}
    a, b = per_case["case_a" + FE], per_case["case_b" + FE]
    assert a["Dice"] == pytest.approx(432 / 440) and a["CC_Dice"] == pytest.approx(0.5)
    assert (a["CC_TP"], a["CC_FN"], a["CC_FP"], a["CC_n_ref"]) == (1, 1, 0, 2)
    assert b["Dice"] == pytest.approx(448 / 456) and b["CC_Dice"] == pytest.approx((1 + 16 / 24) / 2)
    assert (b["CC_TP"], b["CC_FN"], b["CC_FP"]) == (2, 0, 1)
    assert s["mean"]["1"]["CC_Dice"] == pytest.approx((0.5 + (1 + 16 / 24) / 2) / 2)
    assert s["foreground_mean"]["CC_Dice"] == pytest.approx(s["mean"]["1"]["CC_Dice"])
    assert s["mean"]["1"]["CC_FP"] == pytest.approx(0.5)  # false positives per case
    # the missed lesion B in case_a has the worst distance: the volume diagonal (mm), no prediction in its region
    rows = list(csv.DictReader(open(folders / "eval" / "summary_components.csv")))
    assert len(rows) == 4 and {r["case"] for r in rows} == {"case_a", "case_b"}
    missed = [r for r in rows if r["case"] == "case_a" and r["detected"] == "False"]
    assert len(missed) == 1 and int(missed[0]["size_voxels"]) == 8
    assert float(missed[0]["HD95"]) == pytest.approx(np.sqrt(3) * 32)
    assert (folders / "eval" / "summary_cc.png").stat().st_size > 1000
    # stock nnU-Net still reads it
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    assert load_summary_json(str(out))["foreground_mean"]["CC_Dice"] == pytest.approx(s["foreground_mean"]["CC_Dice"])
    assert "CC_Dice" in r.stdout and "FP/case" in r.stdout


def test_physical_units_by_default_and_voxel_units_on_request(tmp_path):
    """A cube predicted 2 slices off along z at 3 mm slice spacing: HD95 6 mm by default, 2 voxels with
    --voxel-units."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    g = np.zeros((24, 24, 24), bool)
    g[6:14, 6:14, 6:14] = True
    p = np.roll(g, 2, axis=0)
    write(ref / f"c{FE}", g, spacing=(1.0, 1.0, 3.0))
    write(pred / f"c{FE}", p, spacing=(1.0, 1.0, 3.0))
    dj = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1}, "numTraining": 1, "file_ending": FE}
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    res = {}
    for mode in ("mm", "voxel"):
        out = tmp_path / f"{mode}.json"
        args = ["-ref", str(ref), "-pred", str(pred), "-djfile", str(tmp_path / "dataset.json"), "-o", str(out)]
        r = run_cli(nnx_cmd("evaluate", *args, *(["--voxel-units"] if mode == "voxel" else [])))
        assert r.returncode == 0, r.stderr[-2000:]
        res[mode] = json.loads(out.read_text())["metric_per_case"][0]["metrics"]["1"]
    assert res["mm"]["CC_HD95"] == pytest.approx(6.0) and res["voxel"]["CC_HD95"] == pytest.approx(2.0)
    assert res["mm"]["CC_Dice"] == pytest.approx(res["voxel"]["CC_Dice"]) == pytest.approx(0.75)


def test_ignore_label_voxels_count_for_nothing(tmp_path):
    from nnx.cc_evaluation import evaluate_cc_folder
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    s = (20, 20, 20)
    g = cube(s, 2, 6).astype(np.uint8)
    g[12:18, 12:18, 12:18] = 2  # ignore
    p = cube(s, 2, 6) | cube(s, 13, 16)  # a blob inside the ignore region is no false positive
    write(ref / f"c{FE}", g)
    write(pred / f"c{FE}", p)
    dj = {"labels": {"background": 0, "x": 1, "ignore": 2}, "file_ending": FE}
    r = evaluate_cc_folder(str(ref), str(pred), dj, "SimpleITKIO", [1], 2, progress=False)[0]["labels"]["1"]
    assert r["CC_Dice"] == 1.0 and r["CC_FP"] == 0


def test_voxel_units_reproduce_the_reference_implementation(monkeypatch):
    """Random multi-component volumes: nnx in voxel units equals CCMetrics (MONAI inside) within float precision."""
    import types
    import warnings
    import torch
    import CCMetrics.CC_base
    # CCMetrics calls gc.collect() after every component; in a test session's large heap that is 90 % of its time
    monkeypatch.setattr(CCMetrics.CC_base, "gc", types.SimpleNamespace(collect=lambda *a: 0))
    from CCMetrics import (CCDiceMetric, CCHausdorffDistance95Metric, CCSurfaceDiceMetric,
                           CCSurfaceDistanceMetric)
    from nnx.cc_metrics import cc_scores, voronoi_regions_per_component
    warnings.filterwarnings("ignore")

    def oh(x):
        return torch.nn.functional.one_hot(torch.from_numpy(x.astype(np.int64)), 2).permute(3, 0, 1, 2)[None]

    for seed in range(3):
        rng = np.random.default_rng(seed)
        zz, yy, xx = np.meshgrid(*[np.arange(40)] * 3, indexing="ij")
        gt, pr = np.zeros((40,) * 3, bool), np.zeros((40,) * 3, bool)
        for i in range(7):
            c, r = rng.uniform(5, 35, 3), rng.uniform(1.5, 4)
            ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
            gt |= ball
            if i % 3:
                pr |= np.roll(ball, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 3)))
        pr[rng.random(pr.shape) > 0.9995] = True  # scattered false positives
        ours = cc_scores(pr, gt, hd_worst=50.0, regions=voronoi_regions_per_component(gt)[0])
        ref = {}
        for key, m in (("CC_Dice", CCDiceMetric(use_caching=False)),
                       ("CC_HD95", CCHausdorffDistance95Metric(use_caching=False, metric_worst_score=50)),
                       ("CC_NSD", CCSurfaceDiceMetric(use_caching=False, class_thresholds=[1])),
                       ("CC_ASSD", CCSurfaceDistanceMetric(use_caching=False, metric_worst_score=50, symmetric=True))):
            m(oh(pr), oh(gt))
            ref[key] = float(m.cc_aggregate().mean())
        assert abs(ours["CC_Dice"] - ref["CC_Dice"]) < 1e-6, seed
        for key in ("CC_HD95", "CC_NSD", "CC_ASSD"):
            assert ours[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), (seed, key)


def test_bad_input_is_a_one_line_error(folders):
    bad = folders / "pred_bad"
    bad.mkdir()
    write(bad / f"case_a{FE}", np.zeros((30, 32, 32), bool))
    write(bad / f"case_b{FE}", np.full((32, 32, 32), 3))  # label 3 not declared
    r = run_cli(nnx_cmd("evaluate", "-ref", str(folders / "ref"), "-pred", str(bad), "-djfile",
                        str(folders / "dataset.json")))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "case_a" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1
    os.remove(bad / f"case_a{FE}")
    r = run_cli(nnx_cmd("evaluate", "-ref", str(folders / "ref"), "-pred", str(bad), "-djfile",
                        str(folders / "dataset.json")))
    assert r.returncode == 2 and "case_b" in r.stderr and "3" in r.stderr
