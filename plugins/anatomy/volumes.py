"""False-positive and false-negative volumes (GRASP's FPV / FNV, spec 003 M5 §4), and the anatomy bench table.

The thesis gives no definition; the spec says: use the autoPET challenge's. Per case, with connected components
(18-connectivity, as the autoPET evaluation script) and the voxel volume from the image spacing::

    FPV = volume (mL) of the predicted components that do not overlap the reference
    FNV = volume (mL) of the reference components that do not overlap the prediction

then averaged over cases ("per patient, averaged"). ``FPV_outside`` is the part of FPV whose components lie
entirely outside the anatomy map's organs: on the phantom that is where the lesion mimics live (lesions only occur
inside organs), i.e. the false positives anatomy knowledge should remove. On a phantom whose dataset.json names
its test cases' mimic masks (``nnx.phantom_mimics``, written by nnx_synth), two direct measures are added:
``FPV_mimics``, the part of FPV whose components overlap a lesion mimic, and the mimic hit rate, the fraction of
mimics (connected components) that the prediction overlaps at all (summed over cases, then divided). Both are
also given for the mimics *outside* the organs alone (``FPV_mimics_outside``, ``mimic_outside_hit_rate``; a mimic
is outside when most of its voxels are on anatomy label 0): the mimics the issue names, whereas the phantom's
spleen mimics lie inside an organ, where the anatomy map does not rule a lesion out.

``python -m nnx_plugins.anatomy.volumes BENCH_OUT`` adds these to a finished ``nnx_bench`` output folder
(``volumes.json``, ``volumes.md``), together with the inference-time ratio GRASP / ANA in. (nnx_bench's core
evaluation reports Dice and CC-Dice; this module keeps the volumes in the plugin).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

CONNECTIVITY_STRUCTURE = ndi.generate_binary_structure(3, 2)  # 18-connectivity (autoPET)


def fp_fn_volumes(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  organs: Optional[np.ndarray] = None, mimics: Optional[np.ndarray] = None) -> Dict[str, float]:
    """FPV, FNV (and FPV_outside when ``organs`` is given; FPV_mimics, ``mimics`` and ``mimics_hit`` (counts of
    mimic components and of those the prediction overlaps) when the mimic mask ``mimics`` is given; with both,
    the same for the mimics outside the organs -- most of their voxels on organ label 0 --: ``FPV_mimics_outside``,
    ``mimics_outside``, ``mimics_outside_hit``) of one case in mL. ``spacing`` in mm (any axis order matching the
    arrays; only the product is used)."""
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    st = CONNECTIVITY_STRUCTURE if pred.ndim == 3 else ndi.generate_binary_structure(pred.ndim, 2)
    lab_p, n_p = ndi.label(pred, st)
    lab_r, n_r = ndi.label(ref, st)
    fp = np.setdiff1d(np.arange(1, n_p + 1), np.unique(lab_p[ref]))
    fn = np.setdiff1d(np.arange(1, n_r + 1), np.unique(lab_r[pred]))
    sizes_p = np.bincount(lab_p.ravel(), minlength=n_p + 1)
    sizes_r = np.bincount(lab_r.ravel(), minlength=n_r + 1)
    out = {"FPV": float(sizes_p[fp].sum()) * voxel_ml, "FNV": float(sizes_r[fn].sum()) * voxel_ml,
           "FP_components": int(len(fp)), "FN_components": int(len(fn))}
    if organs is not None:
        organs = np.asarray(organs) > 0
        inside = np.unique(lab_p[organs])
        outside = np.setdiff1d(fp, inside)
        out["FPV_outside"] = float(sizes_p[outside].sum()) * voxel_ml
    if mimics is not None:
        mimics = np.asarray(mimics) > 0
        at_mimic = np.intersect1d(fp, np.unique(lab_p[mimics]))
        out["FPV_mimics"] = float(sizes_p[at_mimic].sum()) * voxel_ml
        lab_m, n_m = ndi.label(mimics, st)
        hit = np.setdiff1d(np.unique(lab_m[pred]), [0])
        out["mimics"] = int(n_m)
        out["mimics_hit"] = int(len(hit))
        if organs is not None:  # the case: mimics outside every organ (most of their voxels on label 0)
            in_organ = np.bincount(lab_m[organs], minlength=n_m + 1)
            size_m = np.bincount(lab_m.ravel(), minlength=n_m + 1)
            outside_m = np.flatnonzero(2 * in_organ[1:] < size_m[1:]) + 1
            out["mimics_outside"] = int(len(outside_m))
            out["mimics_outside_hit"] = int(len(np.intersect1d(hit, outside_m)))
            at_outside = np.intersect1d(fp, np.unique(lab_p[np.isin(lab_m, outside_m)]))
            out["FPV_mimics_outside"] = float(sizes_p[at_outside].sum()) * voxel_ml
    return out


def folder_volumes(pred_folder: str, ref_folder: str, organ_folder: Optional[str] = None,
                   file_ending: str = ".nii.gz", mimic_folder: Optional[str] = None) -> Dict[str, object]:
    """Per-case volumes and their means over the cases of ``ref_folder`` (with mimic masks: ``mimic_hit_rate``,
    all hit mimics over all mimics, instead of the mean of the per-case counts; with organ maps too,
    ``mimic_outside_hit_rate``, the same over the mimics outside the organs)."""
    import SimpleITK as sitk
    per_case = {}
    for f in sorted(os.listdir(ref_folder)):
        if not f.endswith(file_ending):
            continue
        ref_img = sitk.ReadImage(os.path.join(ref_folder, f))
        ref = sitk.GetArrayFromImage(ref_img)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(pred_folder, f)))
        organs = None
        if organ_folder and os.path.isfile(os.path.join(organ_folder, f)):
            organs = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(organ_folder, f)))
        mimics = None
        if mimic_folder:
            mimics = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(mimic_folder, f)))
        per_case[f[: -len(file_ending)]] = fp_fn_volumes(pred, ref, ref_img.GetSpacing(), organs, mimics)
    counts = {"mimics", "mimics_hit", "mimics_outside", "mimics_outside_hit"}
    keys = sorted({k for v in per_case.values() for k in v} - counts)
    mean = {k: float(np.mean([v[k] for v in per_case.values()])) for k in keys}
    for rate, n_key, hit_key in (("mimic_hit_rate", "mimics", "mimics_hit"),
                                 ("mimic_outside_hit_rate", "mimics_outside", "mimics_outside_hit")):
        n = sum(v.get(n_key, 0) for v in per_case.values())
        if mimic_folder and n:
            mean[rate] = sum(v[hit_key] for v in per_case.values()) / n
    return {"per_case": per_case, "mean": mean}


def _ms(vals: List[float], digits: int = 2) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def grasp_and_its_inference_twin(arms: Sequence[dict]):
    """(GRASP arm name, name of the ANA in. arm whose inference network is GRASP's), or None for a missing one.
    GRASP's inference network is ANA in.'s with the same anatomy input, so the first GRASP arm is paired with the
    AnatomyInputTrainer arm that has the same anatomy input options (``anatomy_encoding``,
    ``anatomy_groups``; defaults filled in)."""
    arms = [a for a in arms if not a.get("dataset")]
    grasp = next((a for a in arms if a["trainer"] == "GRASPTrainer"), None)
    if grasp is None:
        return None, None
    from nnx_plugins.anatomy.trainer import _ANATOMY_OPTIONS  # the options that shape the anatomy input channels
    key = lambda a: tuple(str((a.get("options") or {}).get(k, o.default)).strip()  # noqa: E731
                          for k, o in _ANATOMY_OPTIONS.items())
    twin = next((a for a in arms if a["trainer"] == "AnatomyInputTrainer" and key(a) == key(grasp)), None)
    return grasp["name"], None if twin is None else twin["name"]


def bench_volumes(out: str) -> str:
    """FPV / FNV / FPV_outside over seeds for every evaluated arm of the nnx_bench output folder ``out``; writes
    ``volumes.json`` and ``volumes.md`` there and returns the markdown."""
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    suite, dataset = res["suite"], res["dataset"]
    raw = os.path.join(out, "workspace", "raw", dataset)
    if not os.path.isdir(raw):
        raw = os.path.join(os.environ.get("nnUNet_raw", ""), dataset)
    test = suite["test"]
    path = lambda p: p if os.path.isabs(p) else os.path.join(raw, p)  # noqa: E731
    ref = path(test["labels"])
    organs = path(test.get("inputs", {}).get("anatomy", "anatomyTs"))
    mimic_folder = None
    ds_json = os.path.join(raw, "dataset.json")
    if os.path.isfile(ds_json):
        with open(ds_json) as f:
            rel = ((json.load(f).get("nnx") or {}).get("phantom_mimics") or {}).get("test")
        if rel and os.path.isdir(path(rel)):
            mimic_folder = path(rel)
    rows: Dict[str, Dict[str, List[float]]] = {}
    import re
    for arm in suite["arms"]:
        if arm.get("dataset"):
            continue
        slug = re.sub(r"[^A-Za-z0-9_.+-]", "_", arm["name"])
        for s in range(suite["seeds"]):
            pred = os.path.join(out, "runs", slug, f"seed{s}", "pred")
            if not os.path.isdir(pred):
                continue
            m = folder_volumes(pred, ref, organs if os.path.isdir(organs) else None,
                               mimic_folder=mimic_folder)["mean"]
            r = rows.setdefault(arm["name"], {})
            for k, v in m.items():
                r.setdefault(k, []).append(v)
    acc = res.get("accuracy") or {}
    pred_rows = res.get("predict") or {}
    mim_head, mim_rule = ((" FPV at mimics (mL) | mimics hit | FPV at mimics outside organs (mL) | "
                           "mimics outside organs hit |", "---|---|---|---|") if mimic_folder else ("", ""))
    lines = [f"| arm | Dice | CC-Dice | FPV (mL) | FNV (mL) | FPV outside organs (mL) |{mim_head} predict s/case |",
             f"|---|---|---|---|---|---|{mim_rule}---|"]
    for name, r in rows.items():
        a = acc.get(name, {})
        d = a.get("dice", {}).get("values") or []
        c = a.get("cc_dice", {}).get("values") or []
        sp = pred_rows.get(name, {}).get("s_per_case")
        mim = (f" {_ms(r.get('FPV_mimics', []))} | {_ms(r.get('mimic_hit_rate', []))} | "
               f"{_ms(r.get('FPV_mimics_outside', []))} | {_ms(r.get('mimic_outside_hit_rate', []))} |"
               if mimic_folder else "")
        lines.append(f"| {name} | {_ms(d, 3)} | {_ms(c, 3)} | {_ms(r.get('FPV', []))} | "
                     f"{_ms(r.get('FNV', []))} | {_ms(r.get('FPV_outside', []))} |{mim} "
                     f"{'n/a' if sp is None else f'{sp:.2f}'} |")
    g, ai = grasp_and_its_inference_twin(suite["arms"])
    ratio = None
    if g in pred_rows and ai in pred_rows and pred_rows[ai]["s_per_case"]:
        ratio = pred_rows[g]["s_per_case"] / pred_rows[ai]["s_per_case"]
    speed = res.get("speed_memory") or {}
    if g in speed and ai in speed and speed[ai].get("infer_s_per_patch"):
        patch_ratio = speed[g]["infer_s_per_patch"] / speed[ai]["infer_s_per_patch"]
    else:
        patch_ratio = None
    lines += ["", f"Mean ± sd over seeds of the per-case means (test cases). Inference time GRASP / ANA in.: "
                  f"{'n/a' if ratio is None else f'{ratio:.2f}'} per case, "
                  f"{'n/a' if patch_ratio is None else f'{patch_ratio:.2f}'} per patch (goal 1.00)."]
    md = "\n".join(lines) + "\n"
    from nnx.io_utils import atomic_write_json, atomic_write_text
    atomic_write_json({"volumes": rows, "inference_ratio_grasp_vs_anatomy_input": ratio,
                       "patch_inference_ratio_grasp_vs_anatomy_input": patch_ratio},
                      os.path.join(out, "volumes.json"))
    atomic_write_text(md, os.path.join(out, "volumes.md"))
    return md


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isfile(os.path.join(argv[0], "results.json")):
        print("usage: python -m nnx_plugins.anatomy.volumes BENCH_OUT (a finished nnx_bench output folder)",
              file=sys.stderr)
        return 2
    print(bench_volumes(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
