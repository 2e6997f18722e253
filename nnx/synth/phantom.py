"""One phantom case: body, organs, lesions, lesion mimics, a CT channel and a PET channel.

Everything is generated in voxel space with vectorised numpy/scipy. Arrays are ``(z, y, x)`` (numpy order);
``spacing_zyx`` is used wherever a physical (isotropic) shape is meant (lesions, distances). Organ layout is
expressed in coordinates normalised to the body, so the same anatomy scales with the field of view of a preset.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

# organ label values (anatomy map) — the order is the label order of the "organs" task
ORGANS: Tuple[str, ...] = ("liver", "spleen", "kidney", "bladder", "spine")
ORGAN_ID: Dict[str, int] = {n: i + 1 for i, n in enumerate(ORGANS)}
LESION_ORGANS: Tuple[str, ...] = ("liver", "kidney")
MIMIC_CONTRASTS: Tuple[str, ...] = ("absolute", "relative")  # PhantomParams.mimic_contrast

# tissue ids used internally to build the intensity images
T_AIR, T_FAT, T_SOFT = 0, 1, 2
T_ORGAN0 = 3  # organ k (1-based label) has tissue id T_ORGAN0 + k - 1
N_TISSUE = T_ORGAN0 + len(ORGANS)
_FULL = np.ones((3, 3, 3), bool)


@dataclass
class Case:
    """Arrays of one generated case (all ``(z, y, x)``)."""

    ct: np.ndarray                 # int16, Hounsfield-like
    pet: np.ndarray                # float32, SUV-like
    organs: np.ndarray             # uint8 anatomy map, labels ORGAN_ID
    lesion: np.ndarray             # bool
    body: np.ndarray               # bool
    mimic: np.ndarray              # bool (never an input or label; written for test cases, for evaluation)
    lesion_organs: List[str] = field(default_factory=list)   # organ of each placed lesion
    n_mimics: int = 0


# ---------------------------------------------------------------------------------------------------------------
# random fields


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], corr: Sequence[float], order: int = 3) -> np.ndarray:
    """Zero-mean, unit-variance smooth random field of ``shape`` with correlation length ``corr`` (voxels per axis).

    Gaussian white noise on a coarse lattice (one node per ``corr`` voxels), spline-interpolated to ``shape``
    (separably, one small interpolation matrix per axis).
    """
    shape = tuple(int(s) for s in shape)
    cshape = tuple(max(2, int(np.ceil(s / max(float(c), 1e-3))) + 2) for s, c in zip(shape, corr))
    cshape = tuple(min(cs, s) if s >= 2 else 2 for cs, s in zip(cshape, shape))
    out = rng.standard_normal(cshape).astype(np.float32)
    for ax, (s, c) in enumerate(zip(shape, cshape)):
        if s != c:
            out = np.moveaxis(np.tensordot(_interp_matrix(s, c, order), out, axes=([1], [ax])), 0, ax)
    out = np.ascontiguousarray(out)
    out -= out.mean()
    sd = float(out.std())
    return out / sd if sd > 1e-6 else out


@functools.lru_cache(maxsize=256)
def _interp_matrix(n_out: int, n_in: int, order: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D spline interpolation from n_in to n_out samples (end points aligned)."""
    eye = np.eye(n_in, dtype=np.float64)
    m = ndi.zoom(eye, (n_out / n_in, 1.0), order=order, mode="nearest", grid_mode=False, prefilter=order > 1)
    m = _fit_shape(m, (n_out, n_in))
    m.setflags(write=False)
    return m.astype(np.float32)


def _fit_shape(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    pads = [(0, max(0, s - t)) for s, t in zip(shape, a.shape)]
    a = np.pad(a, pads, mode="edge")
    return a[tuple(slice(0, s) for s in shape)]


def _bbox(center: Sequence[float], radius: Sequence[float], shape: Sequence[int]) -> Tuple[slice, ...]:
    return tuple(slice(max(0, int(np.floor(c - r))), min(s, int(np.ceil(c + r)) + 1))
                 for c, r, s in zip(center, radius, shape))


def blob(rng: np.random.Generator, shape: Sequence[int], center: Sequence[float], radii: Sequence[float],
         angle: float = 0.0, deform: float = 0.3, corr_frac: float = 0.6) -> Tuple[Tuple[slice, ...], np.ndarray]:
    """A deformed ellipsoid: ``r^2 + deform * n < 1`` with ``n`` smooth noise, rotated by ``angle`` in the (y, x)
    plane. Returns the bounding-box slices and the boolean mask inside them (clipped to ``shape``)."""
    grow = 1.0 + 1.2 * deform
    sl = _bbox(center, [r * grow + 1 for r in radii], shape)
    sub = tuple(s.stop - s.start for s in sl)
    if min(sub) <= 0:
        return sl, np.zeros(sub, bool)
    z = (np.arange(sl[0].start, sl[0].stop) - center[0])[:, None, None]
    y = (np.arange(sl[1].start, sl[1].stop) - center[1])[None, :, None]
    x = (np.arange(sl[2].start, sl[2].stop) - center[2])[None, None, :]
    ca, sa = np.cos(angle), np.sin(angle)
    yr = ca * y + sa * x
    xr = -sa * y + ca * x
    r2 = (z / radii[0]) ** 2 + (yr / radii[1]) ** 2 + (xr / radii[2]) ** 2
    if deform > 0:
        n = smooth_noise(rng, sub, [max(1.0, r * corr_frac) for r in radii])
        r2 = r2 + deform * n
    return sl, r2 < 1.0


def mask_bbox(mask: np.ndarray, pad: int = 0) -> Optional[Tuple[slice, ...]]:
    """Bounding box of ``mask`` (slices), grown by ``pad`` voxels; None for an empty mask."""
    sl = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        sl.append(slice(max(0, int(idx[0]) - pad), min(mask.shape[ax], int(idx[-1]) + 1 + pad)))
    return tuple(sl)


def inner_distance(mask: np.ndarray, sampling: Sequence[float]) -> Optional[np.ndarray]:
    """Distance to the outside of ``mask`` (0 outside), computed in the mask's bounding box; None if empty."""
    sl = mask_bbox(mask, 1)
    if sl is None:
        return None
    out = np.zeros(mask.shape, np.float32)
    out[sl] = ndi.distance_transform_edt(mask[sl], sampling=sampling)
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


# ---------------------------------------------------------------------------------------------------------------
# the case generator


@dataclass
class PhantomParams:
    shape: Tuple[int, int, int]
    spacing_zyx: Tuple[float, float, float]
    max_lesions: int = 4
    max_mimics: int = 3
    p_no_lesion: float = 0.15
    lesion_contrast: float = 1.0       # multiplies lesion/mimic CT and PET contrast
    lesion_radius: Tuple[float, float] = (1.5, 5.0)  # in-plane radius range in voxels (log-uniform)
    p_hot_mimic: float = 0.5           # fraction of mimics that are PET-hot ("absolute" mimics)
    # "absolute": a mimic has a lesion's absolute CT value (that of a liver or kidney lesion) wherever it lies,
    # half of the mimics are PET-hot (absolute SUV); "relative": a mimic has a lesion's *contrast* against the
    # tissue around it (CT and PET, always hot) and lies in soft tissue (not fat) or the spleen
    mimic_contrast: str = "absolute"
    pet_block: Tuple[int, int, int] = (1, 2, 2)
    pet_sigma: Tuple[float, float, float] = (0.5, 1.2, 1.2)
    make_pet: bool = True


def _place_small_blob(rng, shape, candidates, r, sx, sz, allowed, occupied):
    """Draw a deformed ellipsoid of radius ~r (mm-scaled in z) centred on a random candidate voxel, restricted to
    ``allowed`` and to free space; mark it (plus a 2-voxel margin) as occupied. None if nothing fits."""
    cand = np.flatnonzero(candidates)
    if cand.size == 0:
        return None
    ci = np.unravel_index(int(cand[rng.integers(cand.size)]), shape)
    rz = max(0.6, r * sx / sz)
    sl, m = blob(rng, shape, ci, (rz * rng.uniform(0.85, 1.15), r * rng.uniform(0.8, 1.2),
                                  r * rng.uniform(0.8, 1.2)),
                 angle=rng.uniform(-np.pi, np.pi), deform=0.3)
    m = m & allowed[sl] & ~occupied[sl]
    if m.sum() < 4:
        return None
    m = largest_component(m)
    occupied[sl] |= ndi.binary_dilation(m, structure=_FULL, iterations=2)
    return sl, m


def generate_case(rng: np.random.Generator, p: PhantomParams) -> Case:
    Z, Y, X = p.shape
    sz, sy, sx = p.spacing_zyx
    shape = (Z, Y, X)
    # normalised coordinates in [-1, 1]
    w = ((np.arange(Z) + 0.5) / Z * 2 - 1).astype(np.float32)[:, None, None]
    v = ((np.arange(Y) + 0.5) / Y * 2 - 1).astype(np.float32)[None, :, None]
    u = ((np.arange(X) + 0.5) / X * 2 - 1).astype(np.float32)[None, None, :]

    # ---- body: an elliptic cylinder whose radius varies smoothly along z, with a smooth random deformation
    cu, cv = rng.uniform(-0.04, 0.04, 2)
    au, av = rng.uniform(0.76, 0.86), rng.uniform(0.56, 0.68)
    zmod = 1.0 + 0.06 * np.sin(np.pi * (w * rng.uniform(0.5, 1.5) + rng.uniform(0, 2)))
    rb = np.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2) / zmod
    rb = rb + 0.035 * smooth_noise(rng, shape, (Z / 3, Y / 6, X / 6))
    body = rb < 1.0
    fat_t = rng.uniform(0.07, 0.14) + 0.03 * smooth_noise(rng, shape, (Z / 3, Y / 5, X / 5))
    interior = body & (rb < 1.0 - fat_t)
    visceral_fat = interior & (smooth_noise(rng, shape, (Z / 5, Y / 10, X / 10)) > rng.uniform(0.6, 1.0))

    # body-relative organ frame -> voxel centre / radii
    hz, hy, hx = Z / 2.0, Y / 2.0, X / 2.0

    def to_vox(wr, vr, ur):
        return ((wr + 1) * hz - 0.5, (cv + av * vr + 1) * hy - 0.5, (cu + au * ur + 1) * hx - 0.5)

    def radii(aw, avr, aur):
        return (aw * hz, avr * av * hy, aur * au * hx)

    organs = np.zeros(shape, np.uint8)
    jit = lambda s=0.06: rng.uniform(-s, s)  # noqa: E731
    scl = lambda: rng.uniform(0.85, 1.15)  # noqa: E731

    # spine: a deformed cylinder along z, posterior, slight curvature
    sp_v = 0.70 + jit(0.04) + 0.05 * np.sin(np.pi * (w[:, 0, 0] * rng.uniform(0.5, 1.0) + rng.uniform(0, 2)))
    sp_u = jit(0.03)
    sp_r = rng.uniform(0.13, 0.16)
    ry = sp_r * av * hy
    rx = sp_r * 1.1 * au * hx
    yc = (cv + av * sp_v + 1) * hy - 0.5
    xc = (cu + au * sp_u + 1) * hx - 0.5
    yy = np.arange(Y)[None, :, None]
    xx = np.arange(X)[None, None, :]
    rs = ((yy - yc[:, None, None]) / ry) ** 2 + ((xx - xc) / rx) ** 2
    rs = rs + 0.25 * smooth_noise(rng, shape, (Z / 4, max(1.0, ry), max(1.0, rx)))
    spine = (rs < 1.0) & interior
    organs[spine] = ORGAN_ID["spine"]

    # soft organs: (name, centre (w, v, u) in body frame, semi-axes (w in half-FOV, v/u in body semi-axes), deform)
    specs = [
        ("kidney", (0.0, 0.42, -0.45), (0.30, 0.22, 0.17), 0.3),
        ("kidney", (-0.05, 0.42, 0.45), (0.30, 0.22, 0.17), 0.3),
        ("liver", (0.30, -0.05, -0.40), (0.55, 0.55, 0.40), 0.45),
        ("spleen", (0.40, 0.30, 0.55), (0.30, 0.26, 0.18), 0.45),
        ("bladder", (-0.72, -0.25, 0.0), (0.22, 0.30, 0.26), 0.25),
    ]
    for name, (wr, vr, ur), (aw, avr, aur), deform in specs:
        c = to_vox(wr + jit(), vr + jit(), ur + jit())
        r = radii(aw * scl(), avr * scl(), aur * scl())
        sl, m = blob(rng, shape, c, r, angle=rng.uniform(-0.4, 0.4), deform=deform * rng.uniform(0.8, 1.2))
        m = m & interior[sl] & (organs[sl] == 0)
        if m.any():
            m = largest_component(m)
            organs[sl][m] = ORGAN_ID[name]

    # ---- lesions (only inside LESION_ORGANS) and mimics (outside them)
    sampling = (sz / sx, sy / sx, 1.0)  # voxel distances in units of the in-plane voxel size
    lesion = np.zeros(shape, bool)
    lesion_value_ct: List[Tuple[Tuple[slice, ...], np.ndarray, float, float]] = []  # (slices, mask, dHU, dSUV)
    lesion_organs: List[str] = []

    n_les = 0 if rng.random() < p.p_no_lesion else int(rng.integers(1, p.max_lesions + 1))
    inner = {}
    for name in LESION_ORGANS:
        inner[name] = inner_distance(organs == ORGAN_ID[name], sampling)
    occupied = np.zeros(shape, bool)
    lo, hi = p.lesion_radius
    for _ in range(n_les):
        for _try in range(25):
            name = "liver" if rng.random() < 0.65 else "kidney"
            if inner[name] is None:
                continue
            r = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            placed = _place_small_blob(rng, shape, (inner[name] >= max(1.0, 0.6 * r)) & ~occupied, r, sx, sz,
                                       organs == ORGAN_ID[name], occupied)
            if placed is None:
                continue
            sl, m = placed
            lesion[sl] |= m
            lesion_value_ct.append((sl, m, -rng.uniform(12, 25), rng.uniform(2.5, 7.0)))
            lesion_organs.append(name)
            break

    # mimics: same size / CT appearance, placed in the spleen or in soft tissue / fat away from lesion organs
    n_mim = int(rng.integers(1, p.max_mimics + 1)) if p.max_mimics > 0 else 0
    les_org = np.isin(organs, [ORGAN_ID[n] for n in LESION_ORGANS])
    dist_les_org = ndi.distance_transform_edt(~les_org, sampling=sampling)
    spleen = organs == ORGAN_ID["spleen"]
    spleen_in = inner_distance(spleen, sampling)
    free_tissue = interior & (organs == 0)
    if p.mimic_contrast not in MIMIC_CONTRASTS:
        raise ValueError(f"mimic_contrast must be one of {MIMIC_CONTRASTS}, got {p.mimic_contrast!r}")
    relative = p.mimic_contrast == "relative"
    soft_in = None
    if relative:  # embedded in soft tissue like a lesion in its organ: not in fat, away from fat and other organs
        free_tissue = free_tissue & ~visceral_fat & (dist_les_org >= 1.5)
        soft_in = inner_distance(free_tissue, sampling)
    mimic = np.zeros(shape, bool)
    mimic_values: List[Tuple[Tuple[slice, ...], np.ndarray, str, float, Optional[float]]] = []
    for _ in range(n_mim):
        for _try in range(25):
            r = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            in_spleen = spleen_in is not None and rng.random() < 0.4
            if in_spleen:
                cand = (spleen_in >= max(1.0, 0.6 * r)) & ~occupied
                allowed = spleen
            elif relative:
                if soft_in is None:
                    continue
                cand = (soft_in >= max(1.0, 0.6 * r)) & (dist_les_org >= r + 2.5) & ~occupied
                allowed = free_tissue
            else:
                cand = free_tissue & (dist_les_org >= r + 2.5) & ~occupied
                allowed = free_tissue & (dist_les_org >= 1.5)
            placed = _place_small_blob(rng, shape, cand, r, sx, sz, allowed, occupied)
            if placed is None:
                continue
            sl, m = placed
            mimic[sl] |= m
            like = "liver" if rng.random() < 0.65 else "kidney"
            if relative:  # the surrounding tissue takes the place of the lesion organ (the draw above is kept:
                # it fixes the random stream that the relative datasets were generated and benchmarked with)
                like = "spleen" if in_spleen else "soft"
            hot = rng.uniform(2.5, 7.0) if rng.random() < (1.0 if relative else p.p_hot_mimic) else None
            mimic_values.append((sl, m, like, -rng.uniform(12, 25), hot))
            break

    # ---- tissue map and per-case intensities
    tissue = np.full(shape, T_AIR, np.uint8)
    tissue[body] = T_FAT
    tissue[interior & ~visceral_fat] = T_SOFT
    om = organs > 0
    tissue[om] = T_ORGAN0 + organs[om] - 1

    hu = np.zeros(N_TISSUE, np.float32)
    hu[T_AIR] = -1000
    hu[T_FAT] = rng.uniform(-110, -80)
    hu[T_SOFT] = rng.uniform(35, 48)
    hu[T_ORGAN0 + ORGAN_ID["liver"] - 1] = rng.uniform(60, 75)
    hu[T_ORGAN0 + ORGAN_ID["spleen"] - 1] = rng.uniform(48, 58)
    hu[T_ORGAN0 + ORGAN_ID["kidney"] - 1] = rng.uniform(24, 34)
    hu[T_ORGAN0 + ORGAN_ID["bladder"] - 1] = rng.uniform(0, 12)
    hu[T_ORGAN0 + ORGAN_ID["spine"] - 1] = rng.uniform(300, 450)
    tex = np.zeros(N_TISSUE, np.float32)
    tex[[T_FAT, T_SOFT]] = (10, 6)
    tex[T_ORGAN0:] = (6, 5, 6, 3, 60)

    ct_mean = hu[tissue]
    # intervertebral discs: periodic darker bands along z inside the spine
    period = max(4.0, Z / rng.uniform(5, 8))
    disc = (np.mod(np.arange(Z) + rng.uniform(0, period), period) < max(1.0, period * 0.22))[:, None, None]
    ct_mean = np.where(spine & disc, np.float32(rng.uniform(70, 100)), ct_mean)
    c = p.lesion_contrast
    organ_hu = {n: hu[T_ORGAN0 + ORGAN_ID[n] - 1] for n in ORGANS}
    organ_hu["soft"] = hu[T_SOFT]
    for (sl, m, dhu, _), name in zip(lesion_value_ct, lesion_organs):
        ct_mean[sl][m] = organ_hu[name] + c * dhu
    for sl, m, like, dhu, _ in mimic_values:
        ct_mean[sl][m] = organ_hu[like] + c * dhu
    # partial volume, texture, noise, multiplicative bias (on attenuation, i.e. HU + 1000)
    ct = ndi.gaussian_filter(ct_mean, (0.3, 0.6, 0.6))
    texture = smooth_noise(rng, shape, (1.5, 2.5, 2.5), order=1)
    ct += tex[tissue] * texture
    ct += rng.normal(0, rng.uniform(8, 13), shape).astype(np.float32)
    bias = 1.0 + rng.uniform(0.008, 0.015) * smooth_noise(rng, shape, (Z / 1.5, Y / 2, X / 2), order=1)
    ct = (ct + 1000.0) * bias - 1000.0
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)

    # ---- PET: physiological uptake (kidney, bladder high), hot lesions, some hot mimics, blur + coarse grid
    if p.make_pet:
        suv = np.zeros(N_TISSUE, np.float32)
        suv[T_FAT] = rng.uniform(0.2, 0.4)
        suv[T_SOFT] = rng.uniform(0.6, 1.0)
        suv[T_ORGAN0 + ORGAN_ID["liver"] - 1] = rng.uniform(1.8, 2.6)
        suv[T_ORGAN0 + ORGAN_ID["spleen"] - 1] = rng.uniform(1.5, 2.2)
        suv[T_ORGAN0 + ORGAN_ID["kidney"] - 1] = rng.uniform(5.0, 10.0)
        suv[T_ORGAN0 + ORGAN_ID["bladder"] - 1] = rng.uniform(12.0, 30.0)
        suv[T_ORGAN0 + ORGAN_ID["spine"] - 1] = rng.uniform(1.2, 2.0)
        pet = suv[tissue]
        organ_suv = {n: suv[T_ORGAN0 + ORGAN_ID[n] - 1] for n in ORGANS}
        organ_suv["soft"] = suv[T_SOFT]
        for (sl, m, _, dsuv), name in zip(lesion_value_ct, lesion_organs):
            pet[sl][m] = organ_suv[name] + c * dsuv
        for sl, m, like, _, hot in mimic_values:
            if hot is not None:
                pet[sl][m] = organ_suv[like if relative else "liver"] + c * hot
        pet = pet * (1.0 + 0.15 * smooth_noise(rng, shape, (2.0, 4.0, 4.0), order=1))
        pet = ndi.gaussian_filter(pet, p.pet_sigma)
        pet = _block_resample(pet, p.pet_block, rng)
        pet = np.clip(pet, 0, None).astype(np.float32)
    else:
        pet = np.zeros((0,), np.float32)

    return Case(ct=ct, pet=pet, organs=organs, lesion=lesion, body=body, mimic=mimic,
                lesion_organs=lesion_organs, n_mimics=len(mimic_values))


def _block_resample(a: np.ndarray, block: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Block-average to a coarser grid, add count-like noise there, and interpolate back (linear)."""
    shape = a.shape
    block = tuple(max(1, int(b)) for b in block)
    pads = [(0, (-s) % b) for s, b in zip(shape, block)]
    ap = np.pad(a, pads, mode="edge")
    cs = tuple(s // b for s, b in zip(ap.shape, block))
    coarse = ap.reshape(cs[0], block[0], cs[1], block[1], cs[2], block[2]).mean(axis=(1, 3, 5))
    coarse = coarse + 0.12 * np.sqrt(np.clip(coarse, 0, None) + 0.05) * rng.standard_normal(cs).astype(np.float32)
    if block == (1, 1, 1):
        return coarse
    up = ndi.zoom(coarse, block, order=1, mode="nearest", grid_mode=True)
    return _fit_shape(up, ap.shape)[tuple(slice(0, s) for s in shape)]
