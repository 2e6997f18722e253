"""``make_dataset``: write a phantom nnU-Net raw dataset with annotation tiers (layout: docs/dataset_format.md)."""
from __future__ import annotations

import multiprocessing
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from scipy import ndimage as ndi

from nnx.errors import NNXError
from nnx.io_utils import atomic_dir, atomic_write_json
from nnx.synth.annotate import CoarseAnnotator, make_scribbles
from nnx.synth.phantom import LESION_ORGANS, MIMIC_CONTRASTS, ORGAN_ID, ORGANS, PhantomParams, generate_case

FILE_ENDING = ".nii.gz"
TIERS = ("expert", "coarse", "scribble", "none")
TASKS = ("lesion", "organs", "joint")
PET_MODES = ("channel", "train_only", "none")
DEFAULT_TIERS = {"expert": 0.75, "coarse": 0.0, "scribble": 0.0, "none": 0.25}
# ITK direction matrix: x and y flipped (LPS); in NIfTI (RAS) this is a plain diagonal affine
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

PRESETS: Dict[str, Dict[str, Any]] = {
    # shape is (z, y, x); num_train counts every training case (imagesTr + imagesUnlabeledTr)
    "tiny": dict(shape=(28, 56, 56), spacing=(1.0, 1.0, 2.5), num_train=11, num_test=3, max_lesions=3,
                 max_mimics=3, pet="channel", lesion_contrast=1.0),
    "small": dict(shape=(40, 80, 80), spacing=(1.0, 1.0, 2.5), num_train=32, num_test=8, max_lesions=4,
                  max_mimics=4, pet="channel", lesion_contrast=1.0),
    "medium": dict(shape=(96, 192, 192), spacing=(1.0, 1.0, 2.5), num_train=80, num_test=20, max_lesions=6,
                   max_mimics=6, pet="channel", lesion_contrast=1.0),
}

# histogram grids of the threshold baseline: CT is integer HU (exact), PET on a 0.01 SUV grid
_CT_LO, _CT_N = -1024, 4096
_PET_STEP, _PET_N = 0.01, 6000

_SEED_GEN, _SEED_COARSE, _SEED_SCRIBBLE, _SEED_TIERS, _SEED_GEOM = 0, 1, 2, 3, 4


# ---------------------------------------------------------------------------------------------------------------
# labels and options


def task_labels(task: str) -> Dict[str, int]:
    if task == "lesion":
        return {"background": 0, "lesion": 1}
    labels = {"background": 0}
    labels.update({n: ORGAN_ID[n] for n in ORGANS})
    if task == "joint":
        labels["lesion"] = len(ORGANS) + 1
    return labels


def anatomy_labels() -> Dict[str, int]:
    return task_labels("organs")


def lesion_label(task: str) -> Optional[int]:
    return task_labels(task).get("lesion")


def parse_tiers(spec: Union[None, str, Mapping[str, float]]) -> Dict[str, float]:
    """``"expert=0.75,none=0.25"`` (or a dict) -> fractions of all four tiers (missing tiers = 0; sum must be 1)."""
    if spec is None:
        return dict(DEFAULT_TIERS)
    if isinstance(spec, str):
        items: Dict[str, Any] = {}
        parts = [p.strip() for p in spec.replace(";", ",").split(",") if p.strip()]
        if not parts:
            raise NNXError("--tiers is empty; expected e.g. 'expert=0.75,none=0.25'")
        for part in parts:
            if part.count("=") != 1:
                raise NNXError(f"--tiers item '{part}' is not of the form tier=fraction (tiers: {', '.join(TIERS)})")
            k, v = (s.strip() for s in part.split("="))
            if k in items:
                raise NNXError(f"--tiers names tier '{k}' twice")
            items[k] = v
    else:
        items = dict(spec)
    out = {t: 0.0 for t in TIERS}
    for k, v in items.items():
        if k not in TIERS:
            raise NNXError(f"--tiers: unknown tier '{k}' (tiers: {', '.join(TIERS)})")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise NNXError(f"--tiers: fraction of '{k}' is not a number: '{v}'") from None
        if not np.isfinite(f) or f < 0 or f > 1:
            raise NNXError(f"--tiers: fraction of '{k}' must be in [0, 1], got {v}")
        out[k] = f
    total = sum(out.values())
    if abs(total - 1.0) > 1e-3:
        raise NNXError(f"--tiers: fractions must sum to 1, got {total:g}")
    if out["expert"] + out["coarse"] + out["scribble"] <= 0:
        raise NNXError("--tiers: at least one of expert, coarse, scribble must be > 0 (imagesTr would be empty)")
    return out


def tier_counts(n: int, fractions: Mapping[str, float]) -> Dict[str, int]:
    """Largest-remainder rounding of ``fractions * n``; at least one labelled (imagesTr) case."""
    raw = {t: fractions.get(t, 0.0) * n for t in TIERS}
    counts = {t: int(np.floor(raw[t] + 1e-9)) for t in TIERS}
    rest = n - sum(counts.values())
    order = sorted(TIERS, key=lambda t: (-(raw[t] - counts[t]), TIERS.index(t)))
    for t in order[:rest]:
        counts[t] += 1
    if counts["expert"] + counts["coarse"] + counts["scribble"] == 0:
        best = max(("expert", "coarse", "scribble"), key=lambda t: fractions.get(t, 0.0))
        counts[best] += 1
        counts["none"] -= 1
    return counts


def _parse_triple(value: Any, what: str, kind: type) -> Tuple:
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,x ]+", value.strip()) if p]
    else:
        parts = list(value)
    try:
        out = tuple(kind(p) for p in parts)
    except (TypeError, ValueError):
        raise NNXError(f"{what} must be three numbers, got '{value}'") from None
    if len(out) != 3 or any(not np.isfinite(x) or x <= 0 for x in out):
        raise NNXError(f"{what} must be three positive numbers, got '{value}'")
    return out


# ---------------------------------------------------------------------------------------------------------------
# report


@dataclass
class SynthReport:
    """What ``make_dataset`` wrote and the statistics of the data (``format()`` = the printed text)."""

    folder: str
    dataset_name: str
    preset: str
    seed: int
    task: str
    pet: str
    shape_zyx: Tuple[int, int, int]
    spacing_xyz: Tuple[float, float, float]
    labels: Dict[str, int]
    tiers: Dict[str, int]
    num_training: int
    num_test: int
    coarse_dice_target: float
    coarse_dice: Dict[str, float]
    scribble_fraction_target: float
    scribble_fraction: float
    scribble_voxels: Dict[str, int]
    lesions: Dict[str, Any]
    threshold_baseline: Dict[str, Dict[str, Any]]
    seconds: float = 0.0
    cases: Dict[str, Dict[str, Any]] = field(default_factory=dict, repr=False)

    def to_dict(self, with_cases: bool = False) -> Dict[str, Any]:
        d = asdict(self)
        if not with_cases:
            d.pop("cases")
        return d

    def format(self) -> str:
        t = self.tiers
        sh = "x".join(str(s) for s in self.shape_zyx)
        sp = "x".join(f"{s:g}" for s in self.spacing_xyz)
        cd = self.coarse_dice
        les = self.lesions
        lines = [
            f"nnx_synth: {self.dataset_name} written to {self.folder} in {self.seconds:.1f} s",
            f"  preset {self.preset}, seed {self.seed}, task {self.task}, PET {self.pet}; "
            f"shape (z,y,x) {sh}, spacing (x,y,z) {sp} mm",
            f"  labels: {', '.join(f'{k}={v}' for k, v in self.labels.items())}",
            f"  training cases {sum(t.values())}: expert {t['expert']}, coarse {t['coarse']}, "
            f"scribble {t['scribble']}, none {t['none']} (numTraining {self.num_training}); "
            f"test cases {self.num_test}",
            f"  coarse vs expert Dice (target {self.coarse_dice_target:.2f}): labelled training "
            f"{_f(cd.get('labelled_train'))}, all training {_f(cd.get('all_train'))}, test {_f(cd.get('test'))}",
            f"  scribbles: annotated fraction {self.scribble_fraction:.4f} "
            f"(target {self.scribble_fraction_target:.4f}); "
            f"voxels per class: " + ", ".join(f"{k} {v}" for k, v in self.scribble_voxels.items()),
            f"  lesions: {les['count']} in {les['cases']} cases ({les['cases_without_lesions']} without lesions; "
            + ", ".join(f"{k} {v}" for k, v in les.get("by_organ", {}).items())
            + f"); voxels per lesion min {les['voxels_min']} / median {les['voxels_median']} / max {les['voxels_max']}",
        ]
        tb = []
        for ch, r in self.threshold_baseline.items():
            thr = "no lesions" if r["threshold"] is None else f"{r['direction']} {r['threshold']:g}"
            tb.append(f"{ch} {r['dice']:.3f} ({thr})")
        lines.append("  best single global threshold, lesion Dice over all training cases pooled: " + ", ".join(tb))
        return "\n".join(lines)


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# I/O


def _write(arr: np.ndarray, path: str, geom: Mapping[str, Any]) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in geom["spacing"]))
    img.SetOrigin(tuple(float(o) for o in geom["origin"]))
    img.SetDirection(tuple(float(d) for d in geom["direction"]))
    sitk.WriteImage(img, path, True)


def _raw_root() -> str:
    raw = os.environ.get("nnUNet_raw", "").strip()
    if not raw:
        raise NNXError("environment variable nnUNet_raw is not set (export nnUNet_raw=/path/to/nnUNet_raw)")
    return raw


def _existing(raw: str, dataset_id: int) -> List[str]:
    if not os.path.isdir(raw):
        return []
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(d for d in os.listdir(raw) if d.startswith(prefix) and os.path.isdir(os.path.join(raw, d)))


# ---------------------------------------------------------------------------------------------------------------
# one case


def _case_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Generate one case and write its images, expert label, anatomy map and scribbles into ``job['root']``.
    Returns its statistics plus ``truth`` and ``geom`` (the coarse mask is made by the caller, in case order)."""
    seed, idx, cid = job["seed"], job["index"], job["case"]
    task, split, tier = job["task"], job["split"], job["tier"]
    params: PhantomParams = job["params"]
    n_classes = len(task_labels(task))
    les_lab = lesion_label(task)
    ignore = n_classes
    root = job["root"]

    case = generate_case(np.random.default_rng([seed, _SEED_GEN, idx]), params)
    g = np.random.default_rng([seed, _SEED_GEOM, idx])
    geom = {"spacing": job["spacing"], "direction": DIRECTION,
            "origin": (round(float(g.uniform(60, 140)), 2), round(float(g.uniform(60, 140)), 2),
                       round(float(g.uniform(-450, -150)), 2))}

    if task == "lesion":
        truth = case.lesion.astype(np.uint8)
    else:
        truth = case.organs.copy()
        if task == "joint":
            truth[case.lesion] = les_lab

    def w(arr, folder, name):
        _write(arr, os.path.join(root, folder, name + FILE_ENDING), geom)

    chans = [case.ct]
    if job["pet"] == "channel":
        chans.append(case.pet)
    stats: Dict[str, Any] = {"case": cid, "index": idx, "split": split, "tier": tier, "truth": truth,
                             "geom": geom}
    if split == "train":
        img_folder = "imagesUnlabeledTr" if tier == "none" else "imagesTr"
        for c, a in enumerate(chans):
            w(a, img_folder, f"{cid}_{c:04d}")
        if job["pet"] == "train_only":
            w(case.pet, "trainOnlyTr", f"{cid}_0000")
        w(truth, "truthTr", cid)
        w(case.organs, "anatomyTr", cid)
        if tier != "none":
            scr = make_scribbles(truth, n_classes, ignore, job["scribble_fraction"],
                                 np.random.default_rng([seed, _SEED_SCRIBBLE, idx]), body=case.body)
            w(scr, "scribblesTr", cid)
            stats["scribble_counts"] = np.bincount(scr.ravel(), minlength=n_classes + 1)[:n_classes].tolist()
            stats["n_voxels"] = int(scr.size)
            if tier in ("expert", "scribble"):  # coarse-tier labels are written with the coarse mask
                w(truth if tier == "expert" else scr, "labelsTr", cid)
        # threshold baseline histograms (all training cases)
        ct_idx = np.clip(case.ct.astype(np.int64) - _CT_LO, 0, _CT_N - 1)
        hists = {"CT": (np.bincount(ct_idx.ravel(), minlength=_CT_N),
                        np.bincount(ct_idx[case.lesion], minlength=_CT_N))}
        if job["pet"] != "none":
            pet_idx = np.clip(np.floor(case.pet / _PET_STEP).astype(np.int64), 0, _PET_N - 1)
            hists["PET"] = (np.bincount(pet_idx.ravel(), minlength=_PET_N),
                            np.bincount(pet_idx[case.lesion], minlength=_PET_N))
        stats["hists"] = hists
    else:
        for c, a in enumerate(chans):
            w(a, "imagesTs", f"{cid}_{c:04d}")
        w(truth, "labelsTs", cid)
        w(case.mimic.astype(np.uint8), "mimicsTs", cid)
        w(case.organs, "anatomyTs", cid)

    lab, n = ndi.label(case.lesion, structure=np.ones((3, 3, 3), bool))
    stats["lesion_sizes"] = np.bincount(lab.ravel())[1:].tolist() if n else []
    stats["lesion_organs"] = list(case.lesion_organs)
    stats["n_mimics"] = int(case.n_mimics)
    return stats


class _CoarseFeedback:
    """Per-case Dice targets such that the running mean of each group of cases stays at the requested target:
    a case whose Dice cannot hit the target exactly (few, small objects) is compensated by the next ones."""

    def __init__(self, target: float):
        self.goal = float(target)
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}

    def target(self, group: str) -> float:
        n = self.counts.get(group, 0)
        t = (n + 1) * self.goal - self.sums.get(group, 0.0)
        return float(min(1.0, max(0.05, self.goal - 0.25, min(self.goal + 0.25, t))))

    def add(self, group: str, d: float) -> None:
        if d is not None and np.isfinite(d):
            self.sums[group] = self.sums.get(group, 0.0) + float(d)
            self.counts[group] = self.counts.get(group, 0) + 1


# ---------------------------------------------------------------------------------------------------------------
# threshold baseline


def best_threshold(hist_all: np.ndarray, hist_les: np.ndarray, edges: np.ndarray) -> Dict[str, Any]:
    """Best lesion Dice of a single global threshold ``x > t`` or ``x < t`` with t on the histogram grid
    (``edges[i]`` is the lower edge of bin i). An exhaustive search over the grid (finer than any quantile grid)."""
    L = float(hist_les.sum())
    if L == 0:
        return {"dice": 0.0, "threshold": None, "direction": ">"}
    ca = np.concatenate([[0], np.cumsum(hist_all, dtype=np.float64)])  # ca[i] = count of bins < i
    cl = np.concatenate([[0], np.cumsum(hist_les, dtype=np.float64)])
    tot_a, tot_l = ca[-1], cl[-1]
    # "> t" at edge i: bins >= i predicted
    d_gt = 2 * (tot_l - cl) / np.maximum((tot_a - ca) + L, 1e-9)
    d_lt = 2 * cl / np.maximum(ca + L, 1e-9)
    i_gt, i_lt = int(np.argmax(d_gt)), int(np.argmax(d_lt))
    e = np.concatenate([edges, [edges[-1] + (edges[-1] - edges[-2])]])
    if d_gt[i_gt] >= d_lt[i_lt]:
        return {"dice": float(d_gt[i_gt]), "threshold": float(e[i_gt]), "direction": ">"}
    return {"dice": float(d_lt[i_lt]), "threshold": float(e[i_lt]), "direction": "<"}


# ---------------------------------------------------------------------------------------------------------------
# the public entry point

_OPTIONS = ("task", "pet", "tiers", "coarse_dice", "scribble_fraction", "num_train", "num_test", "shape", "spacing",
            "lesion_contrast", "max_lesions", "max_mimics", "mimic_contrast", "overwrite", "num_processes", "preview",
            "preview_case", "verbose")


def make_dataset(dataset_id: int, name: Optional[str] = None, preset: str = "tiny", seed: int = 0,
                 **options: Any) -> SynthReport:
    """Write the phantom dataset ``$nnUNet_raw/Dataset{ID:03d}_{name}`` and return its :class:`SynthReport`.

    Options (all optional): ``task`` (lesion|organs|joint, default joint), ``pet`` (channel|train_only|none,
    default per preset), ``tiers`` ("expert=0.75,none=0.25" or a dict), ``coarse_dice`` (0.65),
    ``scribble_fraction`` (0.005), ``num_train``, ``num_test``, ``shape`` (z,y,x), ``spacing`` (x,y,z mm),
    ``lesion_contrast`` (1.0), ``max_lesions``, ``max_mimics``, ``mimic_contrast`` (absolute|relative, default
    absolute: a mimic has a liver or kidney lesion's CT value wherever it lies and half are PET-hot; relative: a
    lesion's contrast against its own surroundings, always PET-hot), ``overwrite`` (False), ``num_processes`` (1),
    ``preview`` (PNG path), ``preview_case``, ``verbose`` (False).
    """
    t0 = time.time()
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise NNXError(f"unknown option(s) {', '.join(unknown)} (known: {', '.join(_OPTIONS)})")
    if preset not in PRESETS:
        raise NNXError(f"unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
    pr = dict(PRESETS[preset])
    try:
        dataset_id = int(dataset_id)
    except (TypeError, ValueError):
        raise NNXError(f"dataset ID must be an integer in 1..999, got '{dataset_id}'") from None
    if not 1 <= dataset_id <= 999:
        raise NNXError(f"dataset ID must be in 1..999, got {dataset_id}")
    if name is None:
        name = "Phantom" + preset.capitalize()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", str(name)):
        raise NNXError(f"dataset name '{name}' must consist of letters, digits, '_' and '-'")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise NNXError(f"seed must be an integer, got '{seed}'") from None
    if seed < 0:
        raise NNXError(f"seed must be >= 0, got {seed}")

    task = options.get("task") or "joint"
    if task not in TASKS:
        raise NNXError(f"unknown task '{task}' (tasks: {', '.join(TASKS)})")
    pet = options.get("pet") or pr["pet"]
    if pet not in PET_MODES:
        raise NNXError(f"unknown PET mode '{pet}' (modes: {', '.join(PET_MODES)})")
    fractions = parse_tiers(options.get("tiers"))
    coarse_dice = _num(options.get("coarse_dice", 0.65), "coarse_dice", 0.05, 1.0)
    scribble_fraction = _num(options.get("scribble_fraction", 0.005), "scribble_fraction", 1e-5, 0.2)
    num_train = int(_num(pr["num_train"] if options.get("num_train") is None else options["num_train"],
                         "num_train", 1, 100000))
    num_test = int(_num(pr["num_test"] if options.get("num_test") is None else options["num_test"],
                        "num_test", 0, 100000))
    shape = _parse_triple(options.get("shape") or pr["shape"], "shape (z,y,x)", int)
    if min(shape) < 8:
        raise NNXError(f"shape (z,y,x) must be at least 8 voxels per axis, got {shape}")
    spacing = _parse_triple(options.get("spacing") or pr["spacing"], "spacing (x,y,z)", float)
    lesion_contrast = _num(options.get("lesion_contrast") or pr["lesion_contrast"], "lesion_contrast", 0.1, 20)
    max_lesions = int(_num(pr["max_lesions"] if options.get("max_lesions") is None else options["max_lesions"],
                           "max_lesions", 0, 1000))
    max_mimics = int(_num(pr["max_mimics"] if options.get("max_mimics") is None else options["max_mimics"],
                          "max_mimics", 0, 1000))
    mimic_contrast = options.get("mimic_contrast") or "absolute"
    if mimic_contrast not in MIMIC_CONTRASTS:
        raise NNXError(f"unknown mimic contrast '{mimic_contrast}' (choices: {', '.join(MIMIC_CONTRASTS)})")
    num_processes = int(_num(options.get("num_processes") or 1, "num_processes", 1, 256))
    verbose = bool(options.get("verbose", False))

    raw = _raw_root()
    ds_name = f"Dataset{dataset_id:03d}_{name}"
    final = os.path.join(raw, ds_name)
    existing = _existing(raw, dataset_id)
    others = [d for d in existing if d != ds_name]
    if others:
        raise NNXError(f"dataset ID {dataset_id} is already used by {others[0]} (remove it or choose another ID)",
                       raw)
    if existing and not options.get("overwrite"):
        raise NNXError(f"{ds_name} already exists (use --overwrite to replace it)", raw)

    counts = tier_counts(num_train, fractions)
    trng = np.random.default_rng([seed, _SEED_TIERS])
    perm = trng.permutation(num_train)
    tier_of = {}
    pos = 0
    for t in TIERS:
        for i in perm[pos:pos + counts[t]]:
            tier_of[int(i)] = t
        pos += counts[t]
    width = max(3, len(str(num_train + num_test - 1)))
    cid = lambda i: f"case_{i:0{width}d}"  # noqa: E731

    params = PhantomParams(
        shape=shape, spacing_zyx=(spacing[2], spacing[1], spacing[0]), max_lesions=max_lesions,
        max_mimics=max_mimics, lesion_contrast=lesion_contrast, mimic_contrast=mimic_contrast,
        lesion_radius=(1.5, max(2.5, 0.09 * min(shape[1], shape[2]))),
        pet_block=(1, max(2, round(shape[2] / 40)), max(2, round(shape[2] / 40))),
        pet_sigma=(0.5, 0.6 * max(2, shape[2] / 40), 0.6 * max(2, shape[2] / 40)),
        make_pet=pet != "none")

    labels = task_labels(task)
    n_classes = len(labels)
    ignore_value = n_classes
    has_scribble = counts["scribble"] > 0

    with atomic_dir(final) as root:
        folders = ["imagesTr", "labelsTr", "truthTr", "coarseTr", "anatomyTr"]
        if counts["expert"] + counts["coarse"] + counts["scribble"] > 0:
            folders.append("scribblesTr")
        if counts["none"]:
            folders.append("imagesUnlabeledTr")
        if pet == "train_only":
            folders.append("trainOnlyTr")
        if num_test:
            folders += ["imagesTs", "labelsTs", "coarseTs", "anatomyTs", "mimicsTs"]
        for f in folders:
            os.makedirs(os.path.join(root, f), exist_ok=True)

        base = {"root": root, "seed": seed, "task": task, "params": params, "spacing": spacing, "pet": pet,
                "coarse_dice": coarse_dice, "scribble_fraction": scribble_fraction}
        jobs = [dict(base, index=i, case=cid(i), split="train", tier=tier_of[i]) for i in range(num_train)]
        jobs += [dict(base, index=num_train + j, case=cid(num_train + j), split="test", tier=None)
                 for j in range(num_test)]
        results: List[Dict[str, Any]] = []
        coarse_fb = _CoarseFeedback(coarse_dice)
        n_classes_task = len(labels)

        def finish(r: Dict[str, Any]) -> None:
            # coarse masks are made here, in case order, so that the running mean Dice of every group of cases
            # (labelled training, unlabeled training, test) is steered to the target (error feedback)
            truth, geom = r.pop("truth"), r.pop("geom")
            idx = int(r.pop("index"))
            group = "test" if r["split"] == "test" else ("train_none" if r["tier"] == "none" else "train")
            annot = CoarseAnnotator(truth, n_classes_task, lesion_label(task), tuple(reversed(spacing)),
                                    np.random.default_rng([seed, _SEED_COARSE, idx]))
            coarse, d, strength = annot.calibrate(coarse_fb.target(group))
            coarse_fb.add(group, d)
            r["coarse_dice"] = d
            r["coarse_strength"] = round(float(strength), 4)
            folders_ = ["coarseTs"] if r["split"] == "test" else ["coarseTr"]
            if r["tier"] == "coarse":
                folders_.append("labelsTr")
            for f in folders_:
                _write(coarse, os.path.join(root, f, r["case"] + FILE_ENDING), geom)
            results.append(r)
            if verbose:
                print(f"  {r['case']} done", flush=True)

        if num_processes > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
                for r in pool.imap(_case_job, jobs):
                    finish(r)
        else:
            for j in jobs:
                finish(_case_job(j))

        # ---- dataset.json
        ds_labels = dict(labels)
        if has_scribble:
            ds_labels["ignore"] = ignore_value
        channel_names = {"0": "CT"}
        if pet == "channel":
            channel_names["1"] = "PET"
        nnx_block: Dict[str, Any] = {
            "format_version": 1,
            "tiers": {cid(i): tier_of[i] for i in range(num_train)},
            "coarse": {"train": "coarseTr", "test": "coarseTs"},
            "scribbles": {"train": "scribblesTr", "ignore_value": ignore_value},
        }
        if counts["none"]:
            nnx_block["unlabeled"] = {"train": "imagesUnlabeledTr"}
        nnx_block["aux_maps"] = {"anatomy": {"train": "anatomyTr", "test": "anatomyTs", "labels": anatomy_labels()}}
        if pet == "train_only":
            nnx_block["train_only_channels"] = {"folder": "trainOnlyTr", "channel_names": {"0": "PET"}}
        nnx_block["phantom_truth"] = "truthTr"
        if num_test:  # evaluation only: where the lesion mimics of the test cases are (1 = mimic)
            nnx_block["phantom_mimics"] = {"test": "mimicsTs"}
        dataset_json = {
            "name": name,
            "description": (f"nnx_synth phantom (preset {preset}, seed {seed}, task {task}, PET {pet}"
                            + (f", {mimic_contrast} mimics)" if mimic_contrast != "absolute" else ")")),
            "channel_names": channel_names,
            "labels": ds_labels,
            "numTraining": counts["expert"] + counts["coarse"] + counts["scribble"],
            "file_ending": FILE_ENDING,
            "overwrite_image_reader_writer": "SimpleITKIO",
            "nnx": nnx_block,
        }
        atomic_write_json(dataset_json, os.path.join(root, "dataset.json"))

        report = _summarise(results, final, ds_name, preset, seed, task, pet, shape, spacing, labels, counts,
                            dataset_json["numTraining"], num_test, coarse_dice, scribble_fraction)
        stats = report.to_dict(with_cases=True)
        stats.pop("folder")
        stats.pop("seconds")
        atomic_write_json(stats, os.path.join(root, "synth_report.json"))

    report.seconds = time.time() - t0
    if options.get("preview"):
        from nnx.synth.preview import preview
        case = options.get("preview_case") or _default_preview_case(report)
        preview(final, case, options["preview"])
    return report


def _num(value: Any, what: str, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise NNXError(f"{what} must be a number, got '{value}'") from None
    if not np.isfinite(v) or v < lo or v > hi:
        raise NNXError(f"{what} must be in [{lo:g}, {hi:g}], got {value}")
    return v


def _default_preview_case(report: SynthReport) -> str:
    """The labelled training case with the most lesions (first one on ties)."""
    best, best_n = None, -1
    for c, s in report.cases.items():
        if s["split"] == "train" and s["tier"] != "none" and len(s["lesion_sizes"]) > best_n:
            best, best_n = c, len(s["lesion_sizes"])
    return best or next(iter(report.cases))


def _summarise(results, folder, ds_name, preset, seed, task, pet, shape, spacing, labels, counts, num_training,
               num_test, coarse_target, scribble_target) -> SynthReport:
    names = list(labels)

    def mean(xs):
        xs = [x for x in xs if x is not None and np.isfinite(x)]
        return float(np.mean(xs)) if xs else float("nan")

    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]
    labelled = [r for r in train if r["tier"] != "none"]
    coarse = {"labelled_train": mean([r["coarse_dice"] for r in labelled]),
              "all_train": mean([r["coarse_dice"] for r in train]),
              "test": mean([r["coarse_dice"] for r in test])}
    scr_tot = np.zeros(len(names), np.int64)
    vox = 0
    for r in labelled:
        scr_tot += np.asarray(r["scribble_counts"], np.int64)
        vox += r["n_voxels"]
    sizes = [s for r in results for s in r["lesion_sizes"]]
    by_organ = {o: sum(r["lesion_organs"].count(o) for r in results) for o in LESION_ORGANS}
    lesions = {"count": len(sizes), "cases": len(results),
               "cases_without_lesions": sum(1 for r in results if not r["lesion_sizes"]),
               "by_organ": by_organ,
               "voxels_min": int(min(sizes)) if sizes else 0,
               "voxels_median": float(np.median(sizes)) if sizes else 0.0,
               "voxels_max": int(max(sizes)) if sizes else 0,
               "mimics": sum(r["n_mimics"] for r in results)}
    tb = {}
    for ch in ("CT", "PET"):
        hs = [r["hists"][ch] for r in train if ch in r["hists"]]
        if not hs:
            continue
        ha = np.sum([h[0] for h in hs], axis=0)
        hl = np.sum([h[1] for h in hs], axis=0)
        edges = (np.arange(_CT_N) + _CT_LO - 0.5) if ch == "CT" else np.arange(_PET_N) * _PET_STEP
        r = best_threshold(ha, hl, edges)
        r["dice"] = round(r["dice"], 4)
        r["threshold"] = None if r["threshold"] is None else round(r["threshold"], 4)
        tb[ch] = r
    cases = {}
    for r in results:
        c = {k: v for k, v in r.items() if k not in ("hists", "case")}
        if c.get("coarse_dice") is not None and np.isfinite(c["coarse_dice"]):
            c["coarse_dice"] = round(float(c["coarse_dice"]), 4)
        else:
            c["coarse_dice"] = None
        cases[r["case"]] = c
    return SynthReport(
        folder=folder, dataset_name=ds_name, preset=preset, seed=seed, task=task, pet=pet,
        shape_zyx=tuple(int(s) for s in shape), spacing_xyz=tuple(float(s) for s in spacing), labels=dict(labels),
        tiers=dict(counts), num_training=num_training, num_test=num_test, coarse_dice_target=coarse_target,
        coarse_dice={k: (round(v, 4) if np.isfinite(v) else None) for k, v in coarse.items()},
        scribble_fraction_target=scribble_target,
        scribble_fraction=round(float(scr_tot.sum() / vox), 6) if vox else 0.0,
        scribble_voxels={n: int(c) for n, c in zip(names, scr_tot)}, lesions=lesions, threshold_baseline=tb,
        cases=cases)
