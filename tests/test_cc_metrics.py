"""Tests for nnx.cc_metrics (CC-Metrics, Jaus et al. AAAI 2025).

Expected values are the hand-computed smoke values of
specs/003-jaus-thesis.md, M6 section 8, plus hand-derived distance checks.
"""
import math
import time

import numpy as np
import pytest
from scipy import ndimage

from nnx.cc_metrics import (
    assd,
    cc_scores,
    default_hd_worst,
    dice,
    hd95,
    label_components,
    nsd,
    surface,
    voronoi_regions,
    voronoi_regions_per_component,
)


# --------------------------------------------------------------------------- helpers
def _two_cubes32():
    gt = np.zeros((32, 32, 32), bool)
    a = np.zeros_like(gt)
    b = np.zeros_like(gt)
    a[4:10, 4:10, 4:10] = True  # 216 voxels
    b[24:26, 24:26, 24:26] = True  # 8 voxels
    gt = a | b
    return gt, a, b


def _ball(shape, center, r):
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in shape)]
    return (zz - center[0]) ** 2 + (yy - center[1]) ** 2 + (xx - center[2]) ** 2 <= r * r


# --------------------------------------------------------------------------- spec section 8
def test_pred_a_only():
    gt, a, b = _two_cubes32()
    assert a.sum() == 216 and b.sum() == 8
    assert dice(a, gt) == pytest.approx(432 / 440)
    assert round(dice(a, gt), 5) == 0.98182
    r = cc_scores(a, gt)
    assert r["n_components"] == 2
    assert [c["Dice"] for c in r["components"]] == [1.0, 0.0]
    assert r["CC_Dice"] == pytest.approx(0.5)
    assert [c["size"] for c in r["components"]] == [216, 8]
    assert sum(c["region_voxels"] for c in r["components"]) == 32 ** 3
    # component 1 perfect: HD95 0, NSD 1; component 2 missed: worst values
    hw = default_hd_worst(gt.shape)
    assert hw == pytest.approx(math.sqrt(3) * 32)
    assert r["components"][0]["HD95"] == 0.0 and r["components"][0]["NSD"] == 1.0
    assert r["components"][1]["HD95"] == hw and r["components"][1]["ASSD"] == hw
    assert r["CC_HD95"] == pytest.approx(hw / 2)
    assert r["CC_NSD"] == pytest.approx(0.5)
    d = r["detection"]
    assert (d["TP"], d["FN"], d["FP"]) == (1, 1, 0)
    assert d["sensitivity"] == pytest.approx(0.5)
    assert [c["detected"] for c in r["components"]] == [True, False]


def test_pred_b_only():
    gt, a, b = _two_cubes32()
    assert round(dice(b, gt), 5) == 0.06897
    assert dice(b, gt) == pytest.approx(16 / 232)
    r = cc_scores(b, gt)
    assert [c["Dice"] for c in r["components"]] == [0.0, 1.0]
    assert r["CC_Dice"] == pytest.approx(0.5)
    d = r["detection"]
    assert (d["TP"], d["FN"], d["FP"]) == (1, 1, 0)


def test_perfect_plus_fp():
    gt, a, b = _two_cubes32()
    pred = gt.copy()
    pred[28:30, 28:30, 28:30] = True  # 8-voxel FP inside B's region
    assert dice(pred, gt) == pytest.approx(448 / 456)
    assert round(dice(pred, gt), 5) == 0.98246
    r = cc_scores(pred, gt, hd_worst=50.0)
    dices = [c["Dice"] for c in r["components"]]
    assert dices[0] == pytest.approx(1.0)
    assert dices[1] == pytest.approx(16 / 24)
    assert r["CC_Dice"] == pytest.approx(5 / 6)
    assert round(r["CC_Dice"], 5) == 0.83333
    d = r["detection"]
    assert (d["TP"], d["FN"], d["FP"]) == (2, 0, 1)
    assert d["sensitivity"] == 1.0
    # FP raises B's HD95 (finite, not the worst value)
    assert 0 < r["components"][1]["HD95"] < 50.0


def test_readme_offset_cubes():
    gt = np.zeros((64, 64, 64), bool)
    pred = np.zeros_like(gt)
    for o in (10, 40):
        gt[o:o + 5, o:o + 5, o:o + 5] = True
        pred[o + 1:o + 6, o + 1:o + 6, o + 1:o + 6] = True
    r = cc_scores(pred, gt)
    assert r["n_components"] == 2
    for c in r["components"]:
        assert c["Dice"] == pytest.approx(2 * 64 / 250)
    assert r["CC_Dice"] == pytest.approx(0.512)
    assert r["detection"]["TP"] == 2 and r["detection"]["FP"] == 0


def test_three_spheres_smallest_removed():
    shape = (64, 64, 64)
    s1, s2, s3 = _ball(shape, (16, 16, 16), 10), _ball(shape, (46, 46, 20), 7), _ball(shape, (20, 48, 48), 3)
    gt = s1 | s2 | s3
    pred = s1 | s2
    r = cc_scores(pred, gt)
    assert r["n_components"] == 3
    assert r["CC_Dice"] == pytest.approx(2 / 3)
    assert dice(pred, gt) > 0.98  # global Dice barely moves
    d = r["detection"]
    assert (d["TP"], d["FN"], d["FP"]) == (2, 1, 0)


def test_empty_empty():
    z = np.zeros((16, 16, 16), bool)
    r = cc_scores(z, z)
    assert len(r["components"]) == 1
    assert r["CC_Dice"] == 1.0 and r["CC_HD95"] == 0.0
    assert r["CC_NSD"] == 1.0 and r["CC_ASSD"] == 0.0
    assert r["n_components"] == 0
    d = r["detection"]
    assert (d["TP"], d["FN"], d["FP"]) == (0, 0, 0)
    assert math.isnan(d["sensitivity"])


def test_empty_gt_nonempty_pred():
    z = np.zeros((16, 16, 16), bool)
    p = z.copy()
    p[2:4, 2:4, 2:4] = True
    p[10, 10, 10] = True
    r = cc_scores(p, z)
    hw = default_hd_worst(z.shape)
    assert len(r["components"]) == 1
    assert r["CC_Dice"] == 0.0 and r["CC_NSD"] == 0.0
    assert r["CC_HD95"] == hw and r["CC_ASSD"] == hw
    assert cc_scores(p, z, hd_worst=50.0)["CC_HD95"] == 50.0
    # spacing changes the default worst value (physical diagonal)
    assert cc_scores(p, z, spacing=(2, 1, 1))["CC_HD95"] == pytest.approx(math.sqrt(32 ** 2 + 2 * 16 ** 2))
    assert r["detection"]["FP"] == 2


# --------------------------------------------------------------------------- Voronoi
def _random_points_gt(seed, shape=(24, 24, 24), n=8):
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, bool)
    pts = set()
    while len(pts) < n:
        p = tuple(int(v) for v in rng.integers(0, shape[0], size=3))
        # keep points isolated so that each one is its own component
        if all(max(abs(p[i] - q[i]) for i in range(3)) > 2 for q in pts):
            pts.add(p)
    for p in pts:
        gt[p] = True
    return gt


def test_voronoi_covers_volume():
    gt = _random_points_gt(0)
    for spacing in (None, (1.5, 1.0, 0.7)):
        reg, n = voronoi_regions(gt, spacing=spacing)
        assert n == 8 and reg.dtype == np.int32
        assert reg.min() == 1 and reg.max() == n
        assert set(np.unique(reg)) == set(range(1, n + 1))
        labels, _ = label_components(gt)
        assert np.array_equal(reg[gt], labels[gt])  # every GT voxel in its own region
    reg, n = voronoi_regions(np.zeros((5, 5, 5), bool))
    assert n == 0 and not reg.any()
    reg, n = voronoi_regions_per_component(np.zeros((5, 5, 5), bool))
    assert n == 0 and not reg.any()


@pytest.mark.parametrize("spacing", [None, (1.0, 1.3, 0.8)])
def test_voronoi_fast_equals_per_component_off_ties(spacing):
    gt = _random_points_gt(1)
    fast, n = voronoi_regions(gt, spacing=spacing)
    slow, n2 = voronoi_regions_per_component(gt, spacing=spacing)
    assert n == n2
    labels, _ = label_components(gt)
    sp = spacing or (1.0, 1.0, 1.0)
    d = np.stack([ndimage.distance_transform_edt(labels != k, sampling=sp) for k in range(1, n + 1)])
    ds = np.sort(d, axis=0)
    tie_free = (ds[1] - ds[0]) > 1e-9
    assert np.array_equal(fast[tie_free], slow[tie_free])
    # at ties, both pick one of the tied nearest components
    dmin = ds[0]
    for reg in (fast, slow):
        chosen = np.take_along_axis(d, (reg - 1)[None], axis=0)[0]
        assert np.allclose(chosen, dmin)
    # Alg. 1: the lowest id wins ties
    tied_min = np.argmax(np.abs(d - dmin) < 1e-9, axis=0) + 1
    assert np.array_equal(slow, tied_min)
    assert tie_free.mean() > 0.9


def test_voronoi_anisotropic_spacing():
    gt = np.zeros((9, 9, 9), bool)
    gt[0, 4, 4] = True  # component 1 (first in scan order)
    gt[4, 0, 4] = True  # component 2
    labels, n = label_components(gt)
    assert n == 2 and labels[0, 4, 4] == 1 and labels[4, 0, 4] == 2
    # voxel (3,4,4): voxel units -> A at 3, B at sqrt(1+16)=4.12 -> A;
    # spacing (2,1,1) -> A at 6 mm, B at sqrt(4+16)=4.47 mm -> B.
    r_vox, _ = voronoi_regions(gt)
    r_mm, _ = voronoi_regions(gt, spacing=(2.0, 1.0, 1.0))
    assert r_vox[3, 4, 4] == 1
    assert r_mm[3, 4, 4] == 2
    # voxel (4,4,4) is a tie in voxel units (4 vs 4) but closer to B in mm
    # with spacing (2,1,1) (8 vs 4) and closer to A with spacing (1,2,1)
    assert r_mm[4, 4, 4] == 2
    assert voronoi_regions(gt, spacing=(1.0, 2.0, 1.0))[0][4, 4, 4] == 1
    assert voronoi_regions_per_component(gt, spacing=(2.0, 1.0, 1.0))[0][4, 4, 4] == 2
    # the assignment changes the CC scores: an FP at (3,4,4) lands in B's region in mm
    pred = gt.copy()
    pred[3, 4, 4] = True
    dv = [c["Dice"] for c in cc_scores(pred, gt)["components"]]
    dm = [c["Dice"] for c in cc_scores(pred, gt, spacing=(2.0, 1.0, 1.0))["components"]]
    assert dv == pytest.approx([2 / 3, 1.0])
    assert dm == pytest.approx([1.0, 2 / 3])


def test_precomputed_regions_reused():
    gt, a, b = _two_cubes32()
    pred = gt.copy()
    pred[28:30, 28:30, 28:30] = True
    reg, _ = voronoi_regions(gt)
    r1 = cc_scores(pred, gt)
    r2 = cc_scores(pred, gt, regions=reg)
    assert r1 == r2


# --------------------------------------------------------------------------- connectivity
def test_connectivity_corner_touch():
    gt = np.zeros((10, 10, 10), bool)
    gt[1:4, 1:4, 1:4] = True
    gt[4:7, 4:7, 4:7] = True  # shares only the corner (3,3,3)-(4,4,4)
    assert label_components(gt, 26)[1] == 1
    assert label_components(gt, 18)[1] == 2
    assert label_components(gt, 6)[1] == 2
    assert cc_scores(gt, gt, connectivity=26)["n_components"] == 1
    assert cc_scores(gt, gt, connectivity=6)["n_components"] == 2
    with pytest.raises(ValueError):
        label_components(gt, 8)


def test_2d_supported():
    gt = np.zeros((10, 10), bool)
    gt[1:3, 1:3] = True
    gt[3:5, 3:5] = True  # diagonal touch
    assert label_components(gt, 8)[1] == 1
    assert label_components(gt, 4)[1] == 2
    r = cc_scores(gt, gt, connectivity=4)
    assert r["CC_Dice"] == 1.0 and r["CC_HD95"] == 0.0


# --------------------------------------------------------------------------- distances
def test_surface_thin_plane_and_cube():
    m = np.zeros((10, 10, 10), bool)
    m[2:7, 2:7, 2:7] = True
    s = surface(m)
    assert s.sum() == 125 - 27  # 5^3 minus the 3^3 interior
    plane = np.zeros((10, 10, 10), bool)
    plane[4] = True  # touches the border -> all surface (border_value=0)
    assert np.array_equal(surface(plane), plane)


def test_distances_parallel_planes_spacing():
    # P = plane x=10, S = plane x=12 (single-voxel thick, full 20x20 slices).
    # Each plane is its own surface; every surface voxel's nearest voxel on
    # the other surface is straight across at 2 voxels -> all distances = 2
    # (voxel units) or 2*2 = 4 mm with spacing (2,1,1) (axis 0 scaled).
    p = np.zeros((30, 20, 20), bool)
    s = np.zeros_like(p)
    p[10] = True
    s[12] = True
    assert hd95(p, s) == pytest.approx(2.0)
    assert assd(p, s) == pytest.approx(2.0)
    assert hd95(p, s, spacing=(2, 1, 1)) == pytest.approx(4.0)
    assert assd(p, s, spacing=(2, 1, 1)) == pytest.approx(4.0)
    # spacing along the other axes does not matter here
    assert hd95(p, s, spacing=(1, 3, 0.5)) == pytest.approx(2.0)
    # NSD: all distances 2 -> tol 1.9 => 0, tol 2 (inclusive) and 3 => 1
    assert nsd(p, s, tol=1.9) == 0.0
    assert nsd(p, s, tol=2.0) == 1.0
    assert nsd(p, s, tol=3.0) == 1.0
    # with spacing (2,1,1) distances are 4 mm: tol 3 => 0, tol 4 => 1
    assert nsd(p, s, tol=3.0, spacing=(2, 1, 1)) == 0.0
    assert nsd(p, s, tol=4.0, spacing=(2, 1, 1)) == 1.0
    assert dice(p, s) == 0.0
    # the same numbers through cc_scores (one GT component)
    r = cc_scores(p, s, spacing=(2, 1, 1), nsd_tol=3.0)
    assert r["CC_HD95"] == pytest.approx(4.0) and r["CC_ASSD"] == pytest.approx(4.0)
    assert r["CC_NSD"] == 0.0 and r["CC_Dice"] == 0.0
    assert r["detection"]["TP"] == 0 and r["detection"]["FP"] == 1


def test_distances_single_voxels_and_empty():
    p = np.zeros((12, 12, 12), bool)
    s = np.zeros_like(p)
    p[5, 5, 5] = True
    s[5, 5, 8] = True
    assert hd95(p, s) == pytest.approx(3.0)
    assert assd(p, s) == pytest.approx(3.0)
    assert hd95(p, s, spacing=(1, 1, 0.5)) == pytest.approx(1.5)
    s2 = s.copy()
    s2[5, 9, 5] = True  # distances p->S: {3}; S->p: {3, 4}
    # MONAI: max(pct95({3}), pct95({3,4})) = max(3, 3.95) = 3.95
    assert hd95(p, s2) == pytest.approx(3.95)
    # ASSD pooled: mean(3, 3, 4) = 10/3
    assert assd(p, s2) == pytest.approx(10 / 3)
    z = np.zeros_like(p)
    assert dice(z, z) == 1.0 and hd95(z, z) == 0.0 and nsd(z, z) == 1.0 and assd(z, z) == 0.0
    assert dice(p, z) == 0.0 and math.isinf(hd95(p, z)) and nsd(p, z) == 0.0 and math.isinf(assd(z, s))


def test_shifted_cube_cc_matches_global():
    # one component: CC metrics equal the global metrics
    gt = np.zeros((24, 24, 24), bool)
    gt[6:14, 6:14, 6:14] = True
    pred = np.roll(gt, 2, axis=0)
    for sp in (None, (2.0, 1.0, 1.0)):
        r = cc_scores(pred, gt, spacing=sp, nsd_tol=1.5)
        assert r["CC_Dice"] == pytest.approx(dice(pred, gt)) == pytest.approx(2 * 6 * 64 / (2 * 512))
        assert r["CC_HD95"] == pytest.approx(hd95(pred, gt, spacing=sp))
        assert r["CC_ASSD"] == pytest.approx(assd(pred, gt, spacing=sp))
        assert r["CC_NSD"] == pytest.approx(nsd(pred, gt, tol=1.5, spacing=sp))
    # the shifted faces are 2 voxels apart, the side faces coincide:
    # HD95 (voxel units) is 2 and doubles with spacing (2,1,1)
    assert hd95(pred, gt) == pytest.approx(2.0)
    assert hd95(pred, gt, spacing=(2, 1, 1)) == pytest.approx(4.0)


# --------------------------------------------------------------------------- timing
def test_timing_128_50_spheres():
    rng = np.random.default_rng(42)
    shape = (128, 128, 128)
    gt = np.zeros(shape, bool)
    for _ in range(50):
        c = rng.integers(8, 120, size=3)
        gt |= _ball(shape, c, int(rng.integers(2, 7)))
    pred = np.roll(gt, 1, axis=1)  # shifted prediction
    pred[:5] = False
    pred[60:64, 60:64, 60:64] = True
    t0 = time.perf_counter()
    r = cc_scores(pred, gt, spacing=(1.0, 0.8, 1.2))
    dt = time.perf_counter() - t0
    assert dt < 30.0
    assert r["n_components"] >= 30
    assert len(r["components"]) == r["n_components"]
    assert 0.0 < r["CC_Dice"] < 1.0
    for c in r["components"]:
        for key in ("Dice", "HD95", "NSD", "ASSD"):
            assert np.isfinite(c[key])
