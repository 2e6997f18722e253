"""Connected-component metrics ("CC-Metrics", Jaus et al., "Every Component
Counts", AAAI 2025), pure numpy/scipy.

Idea
----
The ground truth (GT) ``S`` is split into connected components
``C_1..C_n`` (26-connectivity by default). Every voxel ``t`` of the volume is
assigned to the *generalized Voronoi region* ``R_k`` of its nearest component::

    R_k = {t | d(t, C_k) < d(t, C_j) for all j != k},   d(t, C) = min_{c in C} ||t - c||_2

The regions partition the volume. For each component the local sets are
``P_k = P & R_k`` and ``S_k = S & R_k`` (masking, the shape is kept), a base
metric ``m`` is computed on ``(P_k, S_k)`` and the image score is the
unweighted mean over components::

    CC_m = (1/n) * sum_k m(P_k, S_k)

Because each GT voxel is its own nearest GT voxel, ``S_k`` is exactly the
component ``C_k``.

Voronoi computation
-------------------
* :func:`voronoi_regions` (fast, "Alg. 2"): one exact Euclidean distance
  transform with feature indices,
  ``distance_transform_edt(labels == 0, sampling=spacing, return_indices=True)``,
  then ``regions = labels[tuple(indices)]``. Cost independent of ``n``.
  **Ties**: at voxels exactly equidistant to two or more components the
  winner is whatever scipy's feature transform returns; this may differ from
  "Alg. 1". Only tie-free voxels are guaranteed identical between the two.
* :func:`voronoi_regions_per_component` ("Alg. 1"): one EDT per component,
  strict ``<`` update in ascending component id, i.e. the lowest component id
  wins ties (reference-code behaviour).

``spacing=None`` means voxel units (paper/reference parity). Passing the
physical voxel spacing is an extension: it is used both for the Voronoi EDT
``sampling`` and for all surface distances (then in mm).

Base metrics (per region, boolean masks, same shape)
----------------------------------------------------
* Dice = 2|P & S| / (|P| + |S|)   (1.0 if both are empty).
* Surface ``dS = S XOR binary_erosion(S, generate_binary_structure(ndim, 1))``
  with ``border_value=0`` (voxels on the volume border are surface voxels).
* Surface distances: ``d(p, dS)`` for ``p`` in ``dP`` via the EDT of
  ``~dS`` with ``sampling=spacing`` (and symmetrically).
* HD95 (MONAI convention): ``max(pct95{d(p, dS) : p in dP}, pct95{d(s, dP) : s in dS})``
  with numpy's default (linear) percentile interpolation.
* ASSD: mean of the pooled symmetric surface distances
  ``mean(concat(d(dP->dS), d(dS->dP)))`` (MONAI ``symmetric=True``).
* NSD(tol) = (|{p in dP : d(p, dS) <= tol}| + |{s in dS : d(s, dP) <= tol}|) / (|dP| + |dS|).

Base-metric conventions for empty inputs: both empty -> Dice 1, NSD 1,
HD95 0, ASSD 0; exactly one empty -> Dice 0, NSD 0, HD95/ASSD ``inf``.

Edge rules of :func:`cc_scores` (adopted from the reference ``CC_base.py``)
-------------------------------------------------------------------------
1. GT empty and prediction empty -> one entry (component 0) with the best
   scores: Dice 1, NSD 1, HD95 0, ASSD 0.
2. GT empty and prediction non-empty -> one entry (component 0) with the
   worst scores: Dice 0, NSD 0, HD95 = ASSD = ``hd_worst``.
3. A GT component whose region contains no prediction: Dice 0, NSD 0,
   HD95 = ASSD = ``hd_worst``.
4. Any NaN/inf is replaced by the worst value (0 for Dice/NSD,
   ``hd_worst`` for HD95/ASSD) at aggregation (and in the per-component
   entries). Finite distances larger than ``hd_worst`` are *not* capped.

``hd_worst`` default: the diagonal of the volume,
``sqrt(sum((shape_i * spacing_i)**2))`` (physical units if ``spacing`` is
given, voxel units otherwise); this is >= any finite distance in the volume.
The reference implementation uses a user-set worst value instead (the thesis
uses 50); pass ``hd_worst=50.0`` for that.

Connectivity: 3D supports 6/18/26 (``generate_binary_structure(3, 1|2|3)``);
2D supports 4/8 (``generate_binary_structure(2, 1|2)``); for 2D inputs the
default 26 is mapped to 8 (full connectivity). Predicted components for the
detection counts use the same ``connectivity`` argument (default 26).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "label_components",
    "voronoi_regions",
    "voronoi_regions_per_component",
    "surface",
    "surface_distances",
    "dice",
    "hd95",
    "assd",
    "nsd",
    "default_hd_worst",
    "cc_scores",
]

_CONN_RANK = {
    3: {6: 1, 18: 2, 26: 3},
    2: {4: 1, 8: 2, 26: 2},
}


def _structure(ndim: int, connectivity: int) -> np.ndarray:
    if ndim not in _CONN_RANK:
        raise ValueError(f"only 2D and 3D inputs are supported, got ndim={ndim}")
    try:
        rank = _CONN_RANK[ndim][int(connectivity)]
    except KeyError:
        raise ValueError(
            f"connectivity {connectivity} not supported for {ndim}D; "
            f"use one of {sorted(_CONN_RANK[ndim])}"
        ) from None
    return ndimage.generate_binary_structure(ndim, rank)


def _spacing(spacing: Optional[Sequence[float]], ndim: int) -> tuple:
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} does not match ndim={ndim}")
    if any(s <= 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def label_components(gt: np.ndarray, connectivity: int = 26):
    """Label connected components of a boolean mask.

    Returns ``(labels int32, n)``: background 0, components 1..n.
    3D: connectivity 6/18/26 -> ``generate_binary_structure(3, 1|2|3)``;
    2D: 4/8 (26 is treated as 8).
    """
    gt = np.asarray(gt, dtype=bool)
    labels, n = ndimage.label(gt, structure=_structure(gt.ndim, connectivity))
    return labels.astype(np.int32, copy=False), int(n)


def voronoi_regions(gt_bool: np.ndarray, connectivity: int = 26, spacing=None):
    """Generalized Voronoi regions of the GT components (fast, one EDT).

    ``regions[t] = labels[argmin_{c : labels[c] > 0} ||(t - c) * spacing||_2]``
    computed with ``distance_transform_edt(labels == 0, sampling=spacing,
    return_indices=True)``. Every voxel gets a value in 1..n; all zeros if the
    GT is empty. Exact ties follow scipy's feature transform (may differ from
    :func:`voronoi_regions_per_component`).

    Returns ``(regions int32, n)``.
    """
    gt_bool = np.asarray(gt_bool, dtype=bool)
    labels, n = label_components(gt_bool, connectivity)
    if n == 0:
        return np.zeros(gt_bool.shape, dtype=np.int32), 0
    if n == 1:
        return np.ones(gt_bool.shape, dtype=np.int32), 1
    sp = _spacing(spacing, gt_bool.ndim)
    indices = ndimage.distance_transform_edt(
        labels == 0, sampling=sp, return_distances=False, return_indices=True
    )
    regions = labels[tuple(indices)]
    return regions.astype(np.int32, copy=False), n


def voronoi_regions_per_component(gt_bool: np.ndarray, connectivity: int = 26, spacing=None):
    """Generalized Voronoi regions, reference "Alg. 1": one EDT per component.

    For k = 1..n (ascending) ``d_k = EDT(labels != k, sampling=spacing)``;
    a voxel is moved to k only if ``d_k < best`` (strict), so the lowest
    component id wins exact ties. Cost O(n * |volume|).

    Returns ``(regions int32, n)``.
    """
    gt_bool = np.asarray(gt_bool, dtype=bool)
    labels, n = label_components(gt_bool, connectivity)
    regions = np.zeros(gt_bool.shape, dtype=np.int32)
    if n == 0:
        return regions, 0
    sp = _spacing(spacing, gt_bool.ndim)
    best = np.full(gt_bool.shape, np.inf)
    for k in range(1, n + 1):
        d = ndimage.distance_transform_edt(labels != k, sampling=sp)
        better = d < best
        regions[better] = k
        best[better] = d[better]
    return regions, n


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask XOR binary_erosion(mask, cross structure, border_value=0)``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    er = ndimage.binary_erosion(
        mask, structure=ndimage.generate_binary_structure(mask.ndim, 1), border_value=0
    )
    return mask ^ er


def _crop_to(p: np.ndarray, s: np.ndarray):
    """Crop both masks to the bbox of ``p | s`` padded by one voxel.

    The padding keeps the erosion (and therefore the surfaces) identical to
    the full-volume ones, and all surface voxels lie inside the crop, so the
    EDT-based surface distances are exact.
    """
    u = p | s
    objs = ndimage.find_objects(u.astype(np.uint8))
    if not objs or objs[0] is None:
        return p, s
    sl = tuple(
        slice(max(o.start - 1, 0), min(o.stop + 1, dim)) for o, dim in zip(objs[0], u.shape)
    )
    return p[sl], s[sl]


def surface_distances(p: np.ndarray, s: np.ndarray, spacing=None):
    """Directed surface distances ``(d(dP -> dS), d(dS -> dP))`` as 1D arrays.

    ``d(dP -> dS)[i]`` is the Euclidean distance (scaled by ``spacing``) from
    the i-th surface voxel of ``p`` to the nearest surface voxel of ``s``,
    from the EDT of ``~surface(s)``. If one surface is empty the distances
    from the other one are ``inf``; an empty surface yields an empty array.
    """
    p = np.asarray(p, dtype=bool)
    s = np.asarray(s, dtype=bool)
    if p.shape != s.shape:
        raise ValueError(f"shape mismatch {p.shape} vs {s.shape}")
    sp = _spacing(spacing, p.ndim)
    p, s = _crop_to(p, s)
    sp_, ss_ = surface(p), surface(s)
    np_, ns_ = int(sp_.sum()), int(ss_.sum())
    if np_ == 0 or ns_ == 0:
        return np.full(np_, np.inf), np.full(ns_, np.inf)
    d_to_s = ndimage.distance_transform_edt(~ss_, sampling=sp)
    d_to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return d_to_s[sp_], d_to_p[ss_]


def dice(p: np.ndarray, s: np.ndarray, spacing=None) -> float:
    """Dice = 2|P & S| / (|P| + |S|); 1.0 if both are empty. ``spacing`` unused."""
    p = np.asarray(p, dtype=bool)
    s = np.asarray(s, dtype=bool)
    den = int(p.sum()) + int(s.sum())
    if den == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, s).sum()) / den


def _both_empty(p, s) -> bool:
    return not np.any(p) and not np.any(s)


def hd95(p: np.ndarray, s: np.ndarray, spacing=None) -> float:
    """HD95, MONAI convention: ``max(pct95(d(dP->dS)), pct95(d(dS->dP)))``.

    0 if both masks are empty, ``inf`` if exactly one is empty.
    """
    if _both_empty(p, s):
        return 0.0
    a, b = surface_distances(p, s, spacing)
    if a.size == 0 or b.size == 0:
        return math.inf
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def assd(p: np.ndarray, s: np.ndarray, spacing=None) -> float:
    """ASSD = mean(concat(d(dP->dS), d(dS->dP))); 0 if both empty, inf if one empty."""
    if _both_empty(p, s):
        return 0.0
    a, b = surface_distances(p, s, spacing)
    if a.size == 0 or b.size == 0:
        return math.inf
    return float(np.concatenate([a, b]).mean())


def nsd(p: np.ndarray, s: np.ndarray, tol: float = 1.0, spacing=None) -> float:
    """Normalized surface Dice at tolerance ``tol`` (same units as ``spacing``).

    NSD = (|{x in dP : d(x, dS) <= tol}| + |{y in dS : d(y, dP) <= tol}|) / (|dP| + |dS|);
    1 if both are empty, 0 if exactly one is empty.
    """
    if _both_empty(p, s):
        return 1.0
    a, b = surface_distances(p, s, spacing)
    if a.size == 0 or b.size == 0:
        return 0.0
    return float((np.count_nonzero(a <= tol) + np.count_nonzero(b <= tol)) / (a.size + b.size))


def default_hd_worst(shape: Sequence[int], spacing=None) -> float:
    """Volume diagonal ``sqrt(sum((shape_i * spacing_i)**2))``."""
    sp = _spacing(spacing, len(shape))
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, sp))))


_METRICS = ("Dice", "HD95", "NSD", "ASSD")


def _sanitize(entry: dict, hd_worst: float) -> dict:
    for key in _METRICS:
        v = entry[key]
        if v is None or not np.isfinite(v):
            entry[key] = hd_worst if key in ("HD95", "ASSD") else 0.0
        else:
            entry[key] = float(v)
    return entry


def cc_scores(
    pred_bool: np.ndarray,
    gt_bool: np.ndarray,
    spacing=None,
    nsd_tol: float = 1.0,
    hd_worst: Optional[float] = None,
    connectivity: int = 26,
    regions: Optional[np.ndarray] = None,
) -> dict:
    """Per-component CC-Metrics for one binary case.

    For each GT component k (Voronoi region ``regions == k``):
    ``P_k = pred & (regions == k)``, ``S_k = gt & (regions == k)`` and
    Dice/HD95/NSD/ASSD are computed on ``(P_k, S_k)``; ``CC_<m>`` is the
    unweighted mean over components. See the module docstring for the edge
    rules 1-4 and the ``hd_worst`` default (volume diagonal).

    ``regions``: optional precomputed Voronoi map (from :func:`voronoi_regions`
    on the same GT), so it can be computed once per case and reused; component
    k is then ``gt & (regions == k)`` and ``n = regions.max()``.

    Returns a dict with ``components`` (list of per-component dicts with keys
    component, size, region_voxels, Dice, HD95, NSD, ASSD, detected),
    ``CC_Dice``, ``CC_HD95``, ``CC_NSD``, ``CC_ASSD``, ``n_components`` and
    ``detection`` = {TP, FN, FP, sensitivity}: TP/FN = GT components that
    are / are not overlapped by the prediction; FP = predicted connected
    components (same ``connectivity``) overlapping no GT voxel; sensitivity =
    TP / (TP + FN), NaN without GT components.
    """
    pred = np.asarray(pred_bool, dtype=bool)
    gt = np.asarray(gt_bool, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs gt {gt.shape}")
    sp = _spacing(spacing, gt.ndim)
    if hd_worst is None:
        hd_worst = default_hd_worst(gt.shape, sp)
    hd_worst = float(hd_worst)

    if regions is None:
        regions, n = voronoi_regions(gt, connectivity=connectivity, spacing=sp)
    else:
        regions = np.asarray(regions)
        if regions.shape != gt.shape:
            raise ValueError(f"regions shape {regions.shape} != gt shape {gt.shape}")
        regions = regions.astype(np.int32, copy=False)
        n = int(regions.max()) if regions.size else 0
        if gt.any() and n == 0:
            raise ValueError("regions is empty but the GT is not")

    # predicted components / false positives (detection counts)
    pred_labels, n_pred = label_components(pred, connectivity)
    if n_pred:
        hit = np.unique(pred_labels[gt])
        n_fp = n_pred - int(np.count_nonzero(hit))
    else:
        n_fp = 0

    components = []
    if n == 0:
        if not pred.any():  # rule 1
            e = {"Dice": 1.0, "HD95": 0.0, "NSD": 1.0, "ASSD": 0.0}
        else:  # rule 2
            e = {"Dice": 0.0, "HD95": hd_worst, "NSD": 0.0, "ASSD": hd_worst}
        e.update({"component": 0, "size": 0, "region_voxels": int(gt.size), "detected": False})
        components.append(e)
        tp = fn = 0
    else:
        flat_r = regions.ravel()
        region_vox = np.bincount(flat_r, minlength=n + 1)
        size = np.bincount(flat_r[gt.ravel()], minlength=n + 1)
        psize = np.bincount(flat_r[pred.ravel()], minlength=n + 1)
        inter = np.bincount(flat_r[(pred & gt).ravel()], minlength=n + 1)
        # bounding boxes of (pred | gt) inside each region
        objs = ndimage.find_objects(np.where(pred | gt, regions, 0), max_label=n)
        tp = 0
        for k in range(1, n + 1):
            detected = bool(inter[k] > 0)
            tp += detected
            e = {
                "component": k,
                "size": int(size[k]),
                "region_voxels": int(region_vox[k]),
                "detected": detected,
            }
            if psize[k] == 0:  # rule 3
                e.update({"Dice": 0.0, "HD95": hd_worst, "NSD": 0.0, "ASSD": hd_worst})
            else:
                e["Dice"] = 2.0 * inter[k] / (psize[k] + size[k])
                sl = objs[k - 1]
                sl = tuple(
                    slice(max(o.start - 1, 0), min(o.stop + 1, dim))
                    for o, dim in zip(sl, gt.shape)
                )
                in_r = regions[sl] == k
                pk, sk = pred[sl] & in_r, gt[sl] & in_r
                a, b = surface_distances(pk, sk, sp)
                if a.size == 0 or b.size == 0:
                    e.update({"HD95": math.inf, "ASSD": math.inf, "NSD": 0.0})
                else:
                    e["HD95"] = float(max(np.percentile(a, 95), np.percentile(b, 95)))
                    e["ASSD"] = float(np.concatenate([a, b]).mean())
                    e["NSD"] = float(
                        (np.count_nonzero(a <= nsd_tol) + np.count_nonzero(b <= nsd_tol))
                        / (a.size + b.size)
                    )
            components.append(_sanitize(e, hd_worst))
        fn = n - tp

    out = {"components": components}
    for key in _METRICS:
        out[f"CC_{key}"] = float(np.mean([c[key] for c in components]))
    out["n_components"] = int(n)
    out["detection"] = {
        "TP": int(tp),
        "FN": int(fn),
        "FP": int(n_fp),
        "sensitivity": (tp / (tp + fn)) if (tp + fn) > 0 else float("nan"),
    }
    return out
