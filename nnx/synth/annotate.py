"""Simulated annotations of a phantom case: coarse ("non-expert") masks calibrated to a target Dice, and scribbles."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from nnx.synth.phantom import mask_bbox, smooth_noise

_FULL = np.ones((3, 3, 3), bool)


# ---------------------------------------------------------------------------------------------------------------
# Dice


def confusion(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    idx = truth.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def dice_from_confusion(cm: np.ndarray, classes: Sequence[int]) -> Dict[int, float]:
    """Per-class Dice; classes absent from both truth and prediction are left out."""
    out = {}
    for k in classes:
        tp = cm[k, k]
        ref = cm[k, :].sum()
        pred = cm[:, k].sum()
        if ref + pred > 0:
            out[k] = float(2.0 * tp / (ref + pred))
    return out


def mean_dice(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean Dice over the foreground classes present in truth or prediction (NaN if none is)."""
    d = dice_from_confusion(confusion(truth, pred, n_classes), range(1, n_classes))
    return float(np.mean(list(d.values()))) if d else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# coarse masks


@dataclass
class _Obj:
    label: int
    sl: Tuple[slice, ...]
    sdf: np.ndarray          # signed distance in mm (negative inside), inside the (grown) bounding box
    noise: np.ndarray        # smooth unit-variance field, same box
    radius: float            # equivalent-sphere radius in mm
    offset: float            # signed: > 0 erodes (under-segmentation), < 0 dilates (over-segmentation)
    miss_u: float            # uniform draw: a small lesion is missed when miss_u < p_miss(s)
    size: int
    lesion: bool


S_MAX = 3.0          # upper end of the corruption strength
_OFF = (0.15, 0.35)  # |offset| per unit strength, in units of the object radius
_NOISE = 0.18        # boundary-shift amplitude per unit strength, in units of the object radius
_SMOOTH = 0.12       # smoothing sigma per unit strength, in units of the object radius
_SMALL = 60          # lesions below this many voxels may be missed


def _signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    inside = ndi.distance_transform_edt(mask, sampling=spacing)
    outside = ndi.distance_transform_edt(~mask, sampling=spacing)
    return (outside - inside).astype(np.float32)


def _thickness_radius(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """3 * volume / surface in mm (= the radius for a sphere; about half the thickness for a slab), with the
    voxel-face surface corrected by the mean projection factor 2/3 of a voxelised surface."""
    vol = float(mask.sum()) * float(np.prod(spacing))
    area = 0.0
    for ax in range(mask.ndim):
        faces = np.count_nonzero(np.diff(mask, axis=ax, prepend=False, append=False))
        area += faces * float(np.prod([s for i, s in enumerate(spacing) if i != ax]))
    if area <= 0:
        return 1.0
    return max(0.5, 3.0 * vol / (area * 2.0 / 3.0))


class CoarseAnnotator:
    """Produces a coarse version of a task label with a scalar corruption strength ``s`` (0 = identical).

    Every object (one per organ class, one per lesion component) gets a random signed offset of its boundary
    (dilation / erosion, i.e. over- / under-segmentation), a smooth random boundary shift, a smoothing that
    removes detail, and small lesions can be missed. All random draws are fixed at construction, so the Dice
    to the expert label decreases (almost) monotonically with ``s``; :meth:`calibrate` bisects ``s`` per case.
    """

    def __init__(self, truth: np.ndarray, n_classes: int, lesion_label: Optional[int], spacing_zyx: Sequence[float],
                 rng: np.random.Generator):
        self.truth = truth
        self.n_classes = n_classes
        self.lesion_label = lesion_label
        self.spacing = tuple(float(s) for s in spacing_zyx)
        self.objs: List[_Obj] = []
        for k in range(1, n_classes):
            m = truth == k
            if not m.any():
                continue
            if k == lesion_label:
                lab, n = ndi.label(m, structure=_FULL)
                comps = [lab == i for i in range(1, n + 1)]
            else:
                comps = [m]
            for comp in comps:
                self._add(k, comp, rng, k == lesion_label)

    def _add(self, k: int, comp: np.ndarray, rng: np.random.Generator, lesion: bool) -> None:
        size = int(comp.sum())
        radius = _thickness_radius(comp, self.spacing)
        reach = S_MAX * radius * (_OFF[1] + 3 * _NOISE) + 2 * max(self.spacing)
        box = mask_bbox(comp, 0)
        sl = tuple(slice(max(0, b.start - int(np.ceil(reach / sp))), min(n, b.stop + int(np.ceil(reach / sp))))
                   for b, sp, n in zip(box, self.spacing, comp.shape))
        sub = comp[sl]
        sdf = _signed_distance(sub, self.spacing)
        corr = [max(1.0, 0.8 * radius / sp) for sp in self.spacing]
        noise = smooth_noise(rng, sub.shape, corr)
        sign = 1.0 if rng.random() < 0.5 else -1.0
        offset = sign * rng.uniform(*_OFF)
        self.objs.append(_Obj(k, sl, sdf, noise, radius, offset, float(rng.random()), size, lesion))

    def render(self, s: float) -> np.ndarray:
        out = np.zeros(self.truth.shape, np.uint8)
        for o in self.objs:  # organs in label order first, lesions (highest label in the joint task) last
            if o.lesion and o.size < _SMALL and o.miss_u < min(0.9, 0.35 * s * (1.0 - o.size / _SMALL)):
                continue
            f = o.sdf + np.float32(s * o.radius) * (np.float32(o.offset) + np.float32(_NOISE) * o.noise)
            if s > 0:
                sig = [s * _SMOOTH * o.radius / sp for sp in self.spacing]
                if max(sig) > 0.3:
                    f = ndi.gaussian_filter(f, sig, mode="nearest")
            m = f < 0
            out[o.sl][m] = o.label
        return out

    def dice(self, s: float) -> Tuple[float, np.ndarray]:
        c = self.render(s)
        return mean_dice(self.truth, c, self.n_classes), c

    def calibrate(self, target: float, tol: float = 0.01, iters: int = 10) -> Tuple[np.ndarray, float, float]:
        """Find the strength whose case Dice is closest to ``target`` (safeguarded regula falsi on [0, S_MAX]).
        Returns (coarse mask, Dice, strength)."""
        if not self.objs:
            return np.zeros(self.truth.shape, np.uint8), float("nan"), 0.0
        if target >= 1.0:
            return self.render(0.0), 1.0, 0.0
        lo, d_lo = 0.0, 1.0
        hi = S_MAX
        d_hi, c_hi = self.dice(hi)
        if d_hi >= target:
            return c_hi, d_hi, hi
        best = (abs(d_hi - target), c_hi, d_hi, hi)
        for _ in range(iters):
            t = (d_lo - target) / max(d_lo - d_hi, 1e-9)
            t = min(0.85, max(0.15, t))
            mid = lo + t * (hi - lo)
            d, c = self.dice(mid)
            if abs(d - target) < best[0]:
                best = (abs(d - target), c, d, mid)
            if abs(d - target) <= tol:
                break
            if d > target:
                lo, d_lo = mid, d
            else:
                hi, d_hi = mid, d
        return best[1], best[2], best[3]


# ---------------------------------------------------------------------------------------------------------------
# scribbles

_STEPS = np.array([(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)], np.int64)
_STEP_DIR = _STEPS / np.linalg.norm(_STEPS, axis=1, keepdims=True)


def _makes_block(ann: np.ndarray, y: int, x: int) -> bool:
    """Would annotating (y, x) complete a 2x2 block of annotated pixels (i.e. make the stroke thicker than 1)?"""
    H, W = ann.shape
    for dy in (-1, 1):
        for dx in (-1, 1):
            yy, xx = y + dy, x + dx
            if 0 <= yy < H and 0 <= xx < W and ann[yy, x] and ann[y, xx] and ann[yy, xx]:
                return True
    return False


def _stroke(region: np.ndarray, ann: np.ndarray, start: Tuple[int, int], length: int,
            rng: np.random.Generator) -> List[Tuple[int, int]]:
    """A 1-voxel-wide random path (8-connected) with momentum, staying inside the 2-D ``region`` and never
    completing a 2x2 block with the already annotated pixels ``ann`` (updated in place)."""
    H, W = region.shape
    y, x = start
    if ann[y, x] or _makes_block(ann, y, x):
        return []
    ang = rng.uniform(0, 2 * np.pi)
    path = [(y, x)]
    ann[y, x] = True
    for _ in range(length - 1):
        ang += rng.normal(0, 0.35)
        d = np.array([np.sin(ang), np.cos(ang)])
        order = np.argsort(-(_STEP_DIR @ d))
        moved = False
        for j in order[:3]:
            ny, nx = y + int(_STEPS[j, 0]), x + int(_STEPS[j, 1])
            if 0 <= ny < H and 0 <= nx < W and region[ny, nx] and not ann[ny, nx] and not _makes_block(ann, ny, nx):
                y, x = ny, nx
                ang = float(np.arctan2(_STEPS[j, 0], _STEPS[j, 1]))
                path.append((y, x))
                ann[y, x] = True
                moved = True
                break
        if not moved:
            break
    return path


def make_scribbles(truth: np.ndarray, n_classes: int, ignore_value: int, fraction: float, rng: np.random.Generator,
                   body: Optional[np.ndarray] = None, slice_fraction: float = 0.35) -> np.ndarray:
    """Scribbles on a subset of axial slices (numpy axis 0): thin strokes inside every object of every class
    present (background included), about ``fraction`` of all voxels annotated; the rest is ``ignore_value``."""
    out = np.full(truth.shape, ignore_value, np.uint8)
    budget = max(1, int(round(fraction * truth.size)))
    present = [k for k in range(n_classes) if (truth == k).any()]
    fg = [k for k in present if k > 0]
    shares = {0: 0.4 if fg else 1.0}
    for k in fg:
        shares[k] = 0.6 / len(fg)
    leftovers = 0
    for k in fg + [0]:
        cls_budget = int(round(shares[k] * budget))
        cls_mask = truth == k
        if k == 0:
            cls_budget += leftovers
            if body is not None:
                # background scribbles mostly inside the body (where the decision is hard), some in the air
                regions = [(cls_mask & body, 0.75), (cls_mask & ~body, 0.25)]
            else:
                regions = [(cls_mask, 1.0)]
        else:
            # every object (connected component) of the class gets strokes, budget ~ sqrt(size), at least one
            lab, n = ndi.label(cls_mask, structure=_FULL)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(float)
            w = np.sqrt(sizes) / np.sqrt(sizes).sum()
            regions = [(lab == i + 1, float(w[i])) for i in range(n)]
        got = 0
        for region3d, part in regions:
            got += _class_strokes(out, region3d, k, max(1, int(round(part * cls_budget))), rng, slice_fraction,
                                  ignore_value)
        if k > 0:
            leftovers += max(0, cls_budget - got)
    return out


def _class_strokes(out: np.ndarray, region3d: np.ndarray, k: int, budget: int, rng: np.random.Generator,
                   slice_fraction: float, ignore_value: int) -> int:
    zs = np.flatnonzero(region3d.any(axis=(1, 2)))
    if zs.size == 0 or budget <= 0:
        return 0
    n_sl = max(1, int(round(slice_fraction * zs.size)))
    # a random subset of the slices showing the object; each gets one stroke, further strokes by slice area
    chosen = np.sort(rng.choice(zs, size=min(n_sl, zs.size), replace=False))
    areas = region3d[chosen].sum(axis=(1, 2))
    eroded = {}
    for z in chosen:
        reg = region3d[z]
        e = ndi.binary_erosion(reg, iterations=2)
        if e.sum() < 3:
            e = ndi.binary_erosion(reg, iterations=1)
        if e.sum() < 1:
            e = reg
        eroded[int(z)] = e
    weights = areas / areas.sum()
    got = 0
    tries = 0
    max_len = max(4, int(np.sqrt(region3d.sum() / max(1, zs.size)) * 1.5))
    while got < budget and tries < 200:
        tries += 1
        z = int(chosen[rng.choice(len(chosen), p=weights)]) if tries > len(chosen) else int(chosen[tries - 1])
        reg = eroded[z]
        free = reg & (out[z] == ignore_value)
        cand = np.flatnonzero(free)
        if cand.size == 0:
            continue
        start = np.unravel_index(int(cand[rng.integers(cand.size)]), reg.shape)
        length = int(min(budget - got, rng.integers(max(2, max_len // 2), max_len + 1)))
        ann = out[z] != ignore_value
        path = _stroke(free, ann, (int(start[0]), int(start[1])), max(1, length), rng)
        if not path:
            continue
        ys, xs = np.array(path).T
        new = int((out[z, ys, xs] != k).sum())
        out[z, ys, xs] = k
        got += new
    return got
