"""``nnx_simulate_coarse``: simulated non-expert (coarse) masks for a dataset that has none.

Methods that refine a coarse mask (ReReNet, ``nnxInputsTrainer --opt inputs=coarse``) need a coarse mask for every
training case and, at inference, for every test case. Public datasets rarely ship them; the thesis simulates them
for SegRap2023 by perturbing the expert label (spec ``shared/specs/000-li-thesis.md`` M1.4). This tool does the same
with nnx's calibrated annotator (:class:`nnx.synth.annotate.CoarseAnnotator`: per object a random boundary offset
(over-/under-segmentation), a smooth random boundary shift, smoothing of detail, optionally missed small lesions;
the strength is bisected per case to hit a target Dice)::

    nnx_simulate_coarse -d DATASET_ID --dice 0.8 [--seed 0] [--overwrite] [--lesion-label L]

* ``coarseTr/CASE``: for every training case of tier ``expert`` (every ``labelsTr`` case of a plain nnU-Net dataset),
  simulated from its label; tier ``coarse`` cases get a copy of their ``labelsTr`` file (it is their coarse mask);
  ``scribble``/``none`` cases have no dense label and get none (nnx does not need one for them).
* ``coarseTs/CASE``: for every ``imagesTs`` case, simulated from ``labelsTs/CASE`` (every imagesTs case needs one:
  nnx requires the coarse mask of each test case as an inference input).
* The mean Dice (mean over the foreground classes present, per case) of each folder is steered to ``--dice``: a
  case that cannot hit the target exactly (e.g. a few tiny objects) is compensated by the next ones.
* ``dataset.json``: the ``nnx`` block gets ``"coarse": {"train": "coarseTr", "test": "coarseTs"}``; a dataset
  without a block gets ``format_version`` and ``tiers`` (every imagesTr case ``expert``). Other keys are kept.
* Voxels with nnU-Net's ignore label count as background for the simulation (coarse masks never contain it).
* Files are read and written with the dataset's nnU-Net reader/writer (same geometry as the label). Each folder is
  written under a temporary name and renamed when complete; dataset.json is replaced atomically at the end.

Deterministic for a given ``--seed``. Region-based datasets (list values in ``labels``) are refused.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnx.errors import ArgumentParser, NNXError, cli_entry

TRAIN_FOLDER, TEST_FOLDER = "coarseTr", "coarseTs"


class _Feedback:
    """Per-case Dice targets that keep the running mean of a folder at the goal (as ``nnx_synth`` does)."""

    def __init__(self, goal: float):
        self.goal, self.total, self.n = float(goal), 0.0, 0

    def target(self) -> float:
        t = (self.n + 1) * self.goal - self.total
        return float(min(1.0, max(0.05, self.goal - 0.25, min(self.goal + 0.25, t))))

    def add(self, d: float) -> None:
        if d is not None and np.isfinite(d):
            self.total += float(d)
            self.n += 1


def _label_path(folder: str, p: str) -> str:
    p = os.path.expandvars(p)
    return p if os.path.isabs(p) else os.path.abspath(os.path.join(folder, p))


def _training_labels(folder: str, dj: dict) -> Dict[str, str]:
    """``{case: label file}`` of the imagesTr cases (or of the ``dataset`` key)."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    if "dataset" in dj:
        return {c: _label_path(folder, e["label"]) for c, e in dj["dataset"].items()}
    images = os.path.join(folder, "imagesTr")
    if not os.path.isdir(images):
        raise NNXError("imagesTr folder not found", images)
    ids = get_identifiers_from_splitted_dataset_folder(images, dj["file_ending"])
    out = {str(c): os.path.join(folder, "labelsTr", f"{c}{dj['file_ending']}") for c in ids}
    for c, p in out.items():
        if not os.path.isfile(p):
            raise NNXError(f"missing label file of training case {c!r}", p)
    return out


def _test_labels(folder: str, fe: str) -> Dict[str, str]:
    """``{case: labelsTs file}`` for every imagesTs case; every one must exist."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    images = os.path.join(folder, "imagesTs")
    if not os.path.isdir(images):
        return {}
    ids = [str(c) for c in get_identifiers_from_splitted_dataset_folder(images, fe)]
    out = {c: os.path.join(folder, "labelsTs", c + fe) for c in ids}
    missing = [c for c, p in out.items() if not os.path.isfile(p)]
    if missing:
        more = f" ({len(missing) - 1} more)" if len(missing) > 1 else ""
        raise NNXError(f"imagesTs case {missing[0]!r} has no labelsTs file{more}: its coarse mask cannot be simulated, "
                       f"but nnx needs one for every imagesTs case (add labelsTs, or remove the case)",
                       out[missing[0]])
    return out


def _simulate_case(rw, label_file: str, out_file: str, n_classes: int, ignore: Optional[int],
                   lesion_label: Optional[int], target: float, rng: np.random.Generator) -> Tuple[float, int]:
    """Write the coarse mask of one case; returns (achieved Dice, ignore voxels treated as background)."""
    from nnx.synth.annotate import CoarseAnnotator
    seg, props = rw.read_seg(label_file)
    truth = np.asarray(seg[0])
    if not np.all(np.isfinite(truth)) or np.any(truth != np.round(truth)):
        raise NNXError("label file has non-integer values", label_file)
    truth = truth.astype(np.int64)
    n_ignored = 0
    if ignore is not None:
        n_ignored = int((truth == ignore).sum())
        truth[truth == ignore] = 0
    bad = sorted(set(np.unique(truth).tolist()) - set(range(n_classes)))
    if bad:
        raise NNXError(f"label values {bad} are not declared in dataset.json 'labels'", label_file)
    spacing = tuple(float(s) for s in props["spacing"])
    annot = CoarseAnnotator(truth.astype(np.uint8 if n_classes < 256 else np.uint16), n_classes, lesion_label,
                            spacing, rng)
    mask, dice, _ = annot.calibrate(target)
    rw.write_seg(mask.astype(np.uint8 if n_classes < 256 else np.uint16), out_file, props)
    return float(dice), n_ignored


def _stats(values: List[float]) -> str:
    v = [x for x in values if np.isfinite(x)]
    if not v:
        return "Dice n/a (no foreground)"
    return f"mean Dice {np.mean(v):.3f} (min {np.min(v):.3f}, max {np.max(v):.3f})"


def simulate_coarse(dataset, dice: float = 0.8, seed: int = 0, overwrite: bool = False,
                    lesion_label: Optional[int] = None, verbose: bool = False) -> dict:
    """Write ``coarseTr``/``coarseTs`` and the ``nnx.coarse`` declaration of a raw dataset; returns a report."""
    from nnx import checks
    from nnx.io_utils import atomic_dir, atomic_write_json
    from nnx.tiers import DatasetSpec
    t0 = time.time()
    try:
        dice = float(dice)
    except (TypeError, ValueError):
        raise NNXError(f"--dice must be a number, got {dice!r}") from None
    if not (0.05 <= dice <= 1.0):
        raise NNXError(f"--dice must be in [0.05, 1], got {dice:g}")
    if int(seed) < 0:
        raise NNXError(f"--seed must be >= 0, got {seed}")
    checks.require_env("nnUNet_raw")
    name = checks.resolve_dataset(dataset, where=("raw",))
    folder = os.path.join(os.environ["nnUNet_raw"], name)
    json_path = os.path.join(folder, "dataset.json")
    dj = checks.load_dataset_json(folder)
    labels = dj["labels"]
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise NNXError("region-based 'labels' (list values) are not supported: coarse masks are label maps",
                       json_path)
    task = checks.declared_labels(labels, include_ignore=False)
    n_classes = max(task) + 1
    if n_classes < 2:
        raise NNXError("'labels' declares no foreground class", json_path)
    ignore = int(labels["ignore"]) if "ignore" in labels else None
    if lesion_label is not None and lesion_label not in task[1:]:
        raise NNXError(f"--lesion-label {lesion_label} is not a foreground label (labels: {task[1:]})")
    spec = DatasetSpec.from_dataset_json(dj, json_path)  # an existing nnx block must parse
    fe = dj["file_ending"]
    existing = [f for f in (TRAIN_FOLDER, TEST_FOLDER) if os.path.exists(os.path.join(folder, f))]
    if ("coarse" in spec.entries or existing) and not overwrite:
        what = f"{', '.join(existing)} exist(s)" if existing else "dataset.json already declares nnx.coarse"
        raise NNXError(f"{name} already has coarse masks ({what}); use --overwrite to replace them", folder)

    train = _training_labels(folder, dj)
    test = _test_labels(folder, fe)
    tiers = spec.tiers if spec.has_block else {}
    by_tier: Dict[str, List[str]] = {}
    for c in train:
        by_tier.setdefault(tiers.get(c, "expert"), []).append(c)

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    example = train[next(iter(train))] if train else None
    if example is None:
        raise NNXError("the dataset has no training cases", folder)
    rw = determine_reader_writer_from_dataset_json(dj, example, verbose=False)()

    report = {"dataset": name, "target": dice, "seed": int(seed), "train": {}, "test": {}, "copied": [],
              "ignored_voxels": 0}
    fb_tr, fb_ts = _Feedback(dice), _Feedback(dice)
    with contextlib.ExitStack() as stack:
        d_tr = stack.enter_context(atomic_dir(os.path.join(folder, TRAIN_FOLDER)))
        d_ts = stack.enter_context(atomic_dir(os.path.join(folder, TEST_FOLDER))) if test else None
        for split, cases, out_dir, fb in ((0, by_tier.get("expert", []), d_tr, fb_tr), (1, list(test), d_ts, fb_ts)):
            src = train if split == 0 else test
            for i, c in enumerate(sorted(cases)):
                rng = np.random.default_rng([int(seed), split, i])
                d, n_ign = _simulate_case(rw, src[c], os.path.join(out_dir, c + fe), n_classes, ignore, lesion_label,
                                          fb.target(), rng)
                fb.add(d)
                report["train" if split == 0 else "test"][c] = d
                report["ignored_voxels"] += n_ign
                if verbose:
                    print(f"  {c}: Dice {d:.3f}", flush=True)
        for c in sorted(by_tier.get("coarse", [])):  # their labelsTr file is their coarse mask
            shutil.copyfile(train[c], os.path.join(d_tr, c + fe))
            report["copied"].append(c)
    if not test and os.path.isdir(os.path.join(folder, TEST_FOLDER)):  # --overwrite: no imagesTs any more
        shutil.rmtree(os.path.join(folder, TEST_FOLDER))

    block = dict(dj.get("nnx") or {})
    if not block:
        block["format_version"] = 1
        block["tiers"] = {c: "expert" for c in sorted(train)}
    block["coarse"] = {"train": TRAIN_FOLDER, "test": TEST_FOLDER}
    dj["nnx"] = block
    atomic_write_json(dj, json_path)
    report["skipped"] = sorted(by_tier.get("scribble", []) + by_tier.get("none", []))
    report["seconds"] = time.time() - t0
    report["folder"] = folder
    return report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_simulate_coarse", description=(
        "Simulate non-expert (coarse) masks with a target Dice to the expert labels: coarseTr for the training "
        "cases, coarseTs for the imagesTs cases (from labelsTs), and the nnx.coarse entry of dataset.json."))
    p.add_argument("-d", required=True, help="dataset id or name (in nnUNet_raw)")
    p.add_argument("--dice", type=float, default=0.8, help="target mean Dice of the coarse masks (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing coarse masks")
    p.add_argument("--lesion-label", type=int, default=None, dest="lesion_label",
                   help="label whose connected components are perturbed one by one (small ones may be missed), "
                        "e.g. a lesion class; default: every class is one object")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case's Dice")
    return p


@cli_entry("nnx_simulate_coarse")
def main(argv):
    args = build_parser().parse_args(argv)
    r = simulate_coarse(args.d, args.dice, args.seed, args.overwrite, args.lesion_label, args.verbose)
    tr, ts = list(r["train"].values()), list(r["test"].values())
    print(f"nnx_simulate_coarse: {r['dataset']}: target Dice {r['target']:.3f}, seed {r['seed']}")
    print(f"  {TRAIN_FOLDER}: {len(tr)} simulated mask(s), {_stats(tr)}"
          + (f"; {len(r['copied'])} coarse-tier label(s) copied" if r["copied"] else ""))
    print(f"  {TEST_FOLDER}: {len(ts)} simulated mask(s)" + (f", {_stats(ts)}" if ts else " (no imagesTs cases)"))
    if r["skipped"]:
        print(f"  no coarse mask for {len(r['skipped'])} scribble/unlabeled case(s)")
    if r["ignored_voxels"]:
        print(f"  {r['ignored_voxels']} ignore-label voxel(s) treated as background")
    print(f"  dataset.json: nnx.coarse = {{train: {TRAIN_FOLDER}, test: {TEST_FOLDER}}} ({r['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
