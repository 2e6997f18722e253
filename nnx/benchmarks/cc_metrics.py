"""Benchmark: nnx's CC-Metrics against the authors' reference implementation (``CCMetrics`` on PyPI), same case.

    python -m nnx.benchmarks.cc_metrics [--size 256] [--components 100] [--seed 0] [--metrics dice,hd95,nsd,assd]

Builds a reference volume with N spherical lesions (radii 2-8 voxels) and a prediction that misses some, dilates
some, erodes some and adds false positives; then times, on the same case:

* nnx voxel-units mode (reference parity: per-component Voronoi, voxel units) and nnx default mode (one
  feature-transform Voronoi, physical spacing 1 mm here), all four metrics from one Voronoi assignment;
* the reference: one ``CC*Metric`` per metric (MONAI inside), Voronoi cached between them as its README advises.

Prints the times, the ratio nnx / reference and the largest difference of the per-case means (voxel-units mode).
Needs ``pip install CCMetrics monai connected-components-3d``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def make_case(size: int, n: int, seed: int):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    gt = np.zeros((size,) * 3, bool)
    pred = np.zeros_like(gt)
    for i in range(n):
        r = rng.uniform(2, 8)
        c = rng.uniform(r + 1, size - r - 1, 3)
        lo = np.maximum(np.floor(c - r - 3).astype(int), 0)
        hi = np.minimum(np.ceil(c + r + 3).astype(int), size)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        zz, yy, xx = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
        ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= r * r
        gt[sl] |= ball
        kind = i % 5
        if kind == 0:
            continue  # missed
        if kind == 1:
            ball = ndimage.binary_dilation(ball)
        elif kind == 2:
            ball = ndimage.binary_erosion(ball)
        pred[sl] |= ball
    for _ in range(n // 5):  # false positives
        c = rng.integers(3, size - 3, 3)
        pred[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2] = True
    return pred, gt


def run_nnx(pred, gt, voxel_units: bool, nsd_tol: float, hd_worst: float):
    from nnx.cc_metrics import cc_scores, voronoi_regions, voronoi_regions_per_component
    t0 = time.perf_counter()
    regions = voronoi_regions_per_component(gt)[0] if voxel_units else voronoi_regions(gt, spacing=(1.0,) * 3)[0]
    r = cc_scores(pred, gt, spacing=None if voxel_units else (1.0,) * 3, nsd_tol=nsd_tol, hd_worst=hd_worst,
                  regions=regions)
    return time.perf_counter() - t0, r


def run_reference(pred, gt, metrics, nsd_tol: float, hd_worst: float):
    import torch
    from CCMetrics import (CCDiceMetric, CCHausdorffDistance95Metric, CCSurfaceDiceMetric,
                           CCSurfaceDistanceMetric)
    def oh(x):
        t = torch.from_numpy(x.astype(np.int64))
        return torch.nn.functional.one_hot(t, 2).permute(3, 0, 1, 2)[None]
    cache = tempfile.mkdtemp(prefix="ccm_cache_")
    make = {"dice": lambda: CCDiceMetric(use_caching=True, caching_dir=cache),
            "hd95": lambda: CCHausdorffDistance95Metric(use_caching=True, caching_dir=cache,
                                                        metric_worst_score=hd_worst),
            "nsd": lambda: CCSurfaceDiceMetric(use_caching=True, caching_dir=cache, class_thresholds=[nsd_tol]),
            "assd": lambda: CCSurfaceDistanceMetric(use_caching=True, caching_dir=cache, symmetric=True,
                                                    metric_worst_score=hd_worst)}
    p, g = oh(pred), oh(gt)
    out, t0 = {}, time.perf_counter()
    for m in metrics:
        metric = make[m]()
        metric(p, g)
        out[m] = float(metric.cc_aggregate().mean())
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnx.benchmarks.cc_metrics", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--components", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics", default="dice,hd95,nsd,assd")
    ap.add_argument("--skip-reference", action="store_true")
    a = ap.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore")
    metrics = [m for m in a.metrics.split(",") if m]
    pred, gt = make_case(a.size, a.components, a.seed)
    from nnx.cc_metrics import label_components
    n = label_components(gt)[1]
    hd_worst, tol = 50.0, 1.0
    print(f"case {a.size}^3, {n} reference components, {int(gt.sum())} / {int(pred.sum())} voxels (ref / pred)")
    t_par, r_par = run_nnx(pred, gt, True, tol, hd_worst)
    t_fast, r_fast = run_nnx(pred, gt, False, tol, hd_worst)
    keys = {"dice": "CC_Dice", "hd95": "CC_HD95", "nsd": "CC_NSD", "assd": "CC_ASSD"}
    print(f"  nnx voxel units (reference parity) {t_par:8.2f} s  " +
          "  ".join(f"{keys[m]} {r_par[keys[m]]:.6f}" for m in metrics))
    print(f"  nnx default (one EDT, mm)          {t_fast:8.2f} s  " +
          "  ".join(f"{keys[m]} {r_fast[keys[m]]:.6f}" for m in metrics))
    if a.skip_reference:
        return 0
    t_ref, r_ref = run_reference(pred, gt, metrics, tol, hd_worst)
    print(f"  reference CCMetrics ({', '.join(metrics)}) {t_ref:8.2f} s  " +
          "  ".join(f"{keys[m]} {r_ref[m]:.6f}" for m in metrics))
    print(f"  time ratio nnx/reference: voxel-units mode {t_par / t_ref:.3f}, default mode {t_fast / t_ref:.3f}")
    print("  max |nnx voxel-units - reference| per metric: " +
          ", ".join(f"{keys[m]} {abs(r_par[keys[m]] - r_ref[m]):.2e}" for m in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
