"""CC-Metrics for a folder of predictions, merged into nnU-Net's summary.json schema.

For every case and every foreground label (or region) of dataset.json: binary masks of reference and prediction
(ignore-label voxels set to 0 in both, before the Voronoi step), ONE Voronoi assignment of the reference's
components, then :func:`nnx.cc_metrics.cc_scores` with those regions.

* default: physical units. Spacing of the reference image for the Voronoi EDT and all distances (mm); fast
  feature-transform Voronoi (exact ties broken by scipy).
* ``voxel_units=True``: the authors' reference implementation (``CCMetrics`` on PyPI): voxel units and its tie rule
  (one EDT per component, lowest component id wins), which reproduces it to float precision.

Summary keys (beside nnU-Net's ``Dice``, ``IoU``, ... in ``metric_per_case[i]["metrics"][label]``, ``mean[label]``
and ``foreground_mean``): ``CC_Dice``, ``CC_HD95``, ``CC_NSD``, ``CC_ASSD`` (means over the case's components),
``CC_n_ref`` (reference components), ``CC_TP``, ``CC_FN``, ``CC_FP`` (detected / missed reference components,
predicted components touching no reference component), ``CC_sensitivity``. Per-case means average over cases
(NaN-free by the edge rules); ``CC_FP`` in the means is false positives per case.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

CC_KEYS = ("CC_Dice", "CC_HD95", "CC_NSD", "CC_ASSD")
COUNT_KEYS = ("CC_n_ref", "CC_TP", "CC_FN", "CC_FP", "CC_sensitivity")
CSV_FIELDS = ("case", "label", "component", "size_voxels", "size_mm3", "region_voxels", "Dice", "HD95", "NSD", "ASSD",
              "detected")


def evaluate_case(job: dict) -> dict:
    """CC metrics of one (reference, prediction) pair for every label; runs in a spawn pool."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnx.cc_metrics import cc_scores, voronoi_regions, voronoi_regions_per_component
    rw = recursive_find_reader_writer_by_name(job["rw"])()
    ref, props = rw.read_seg(job["ref"])
    pred, _ = rw.read_seg(job["pred"])
    ref, pred = ref[0], pred[0]
    spacing = None if job["voxel_units"] else tuple(float(s) for s in props["spacing"])
    valid = None if job["ignore"] is None else ref != job["ignore"]
    voxel_mm3 = float(np.prod(props["spacing"]))
    out = {"case": job["case"], "prediction_file": job["pred"], "reference_file": job["ref"], "labels": {},
           "components": []}
    for label in job["labels"]:
        gt, pr = region_or_label_to_mask(ref, label), region_or_label_to_mask(pred, label)
        if valid is not None:
            gt &= valid
            pr &= valid
        if gt.any():
            regions = (voronoi_regions_per_component(gt)[0] if job["voxel_units"]
                       else voronoi_regions(gt, spacing=spacing)[0])
        else:
            regions = None
        r = cc_scores(pr, gt, spacing=spacing, nsd_tol=job["nsd_tol"], hd_worst=job["hd_worst"], regions=regions)
        det = r["detection"]
        key = str(label) if not isinstance(label, (tuple, list)) else str(tuple(label))
        out["labels"][key] = {**{k: float(r[k]) for k in CC_KEYS}, "CC_n_ref": int(r["n_components"] if gt.any() else 0),
                              "CC_TP": int(det["TP"]), "CC_FN": int(det["FN"]), "CC_FP": int(det["FP"]),
                              "CC_sensitivity": float(det["sensitivity"])}
        if gt.any():
            for c in r["components"]:
                out["components"].append({"case": job["case"], "label": key, "component": c["component"],
                                          "size_voxels": c["size"], "size_mm3": round(c["size"] * voxel_mm3, 3),
                                          "region_voxels": c["region_voxels"], "Dice": c["Dice"], "HD95": c["HD95"],
                                          "NSD": c["NSD"], "ASSD": c["ASSD"], "detected": bool(c["detected"])})
    return out


def evaluate_cc_folder(ref_folder: str, pred_folder: str, dataset_json: dict, rw_name: str, labels: Sequence,
                       ignore_label: Optional[int], voxel_units: bool = False, nsd_tol: float = 1.0,
                       hd_worst: Optional[float] = None, num_processes: int = 1, progress: bool = True) -> List[dict]:
    fe = dataset_json["file_ending"]
    cases = sorted(f[: -len(fe)] for f in os.listdir(pred_folder) if f.endswith(fe))
    jobs = [{"case": c, "ref": os.path.join(ref_folder, c + fe), "pred": os.path.join(pred_folder, c + fe),
             "rw": rw_name, "labels": [tuple(x) if isinstance(x, (list, tuple)) else int(x) for x in labels],
             "ignore": ignore_label, "voxel_units": voxel_units, "nsd_tol": nsd_tol, "hd_worst": hd_worst}
            for c in cases]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="CC-Metrics", disable=not progress)
    results = []
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for r in pool.imap(evaluate_case, jobs):
                results.append(r)
                bar.update()
    else:
        for j in jobs:
            results.append(evaluate_case(j))
            bar.update()
    bar.close()
    return results


def merge_into_summary(summary: dict, results: List[dict]) -> dict:
    """Add the CC keys to nnU-Net's summary dict (string label keys, as in summary.json)."""
    by_pred = {os.path.abspath(r["prediction_file"]): r for r in results}
    per_label: Dict[str, Dict[str, list]] = {}
    for entry in summary["metric_per_case"]:
        r = by_pred.get(os.path.abspath(entry["prediction_file"]))
        if r is None:
            continue
        for key, vals in r["labels"].items():
            entry["metrics"].setdefault(key, {}).update(vals)
            for k, v in vals.items():
                per_label.setdefault(key, {}).setdefault(k, []).append(v)
    for key, vals in per_label.items():
        summary["mean"].setdefault(key, {}).update({k: float(np.nanmean(v)) if len(v) else float("nan")
                                                   for k, v in vals.items()})
    if per_label:
        for k in CC_KEYS + COUNT_KEYS:
            summary["foreground_mean"][k] = float(np.nanmean([summary["mean"][key][k] for key in per_label]))
    return summary


def write_components_csv(results: List[dict], path: str) -> str:
    from nnx.io_utils import atomic_write_text
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in results:
        for row in r["components"]:
            w.writerow(row)
    atomic_write_text(buf.getvalue(), path)
    return path


def plot(results: List[dict], summary: dict, path: str) -> str:
    """Per-lesion Dice against lesion size, and global Dice against CC-Dice per case (first label with
    components)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [row for r in results for row in r["components"]]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4.2))
    if rows:
        ax[0].scatter([max(r["size_mm3"], 1e-3) for r in rows], [r["Dice"] for r in rows], s=12, alpha=0.7)
        ax[0].set_xscale("log")
    ax[0].set_xlabel("lesion (reference component) volume [mm³]")
    ax[0].set_ylabel("per-lesion Dice (in its Voronoi region)")
    ax[0].set_title("every component counts")
    pts = []
    for entry in summary["metric_per_case"]:
        for key, m in entry["metrics"].items():
            if "CC_Dice" in m and m.get("CC_n_ref", 0) > 0 and m.get("Dice") is not None:
                pts.append((m["Dice"], m["CC_Dice"]))
    if pts:
        ax[1].scatter([p[0] for p in pts], [p[1] for p in pts], s=14)
    ax[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    ax[1].set_xlim(0, 1)
    ax[1].set_ylim(0, 1)
    ax[1].set_xlabel("global Dice (case, label)")
    ax[1].set_ylabel("CC-Dice")
    ax[1].set_title("global vs connected-component Dice")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def cc_summary_for_folder(ref: str, pred: str, dataset_json: dict, summary_file: str, rw_name: str,
                          num_processes: int = 1, voxel_units: bool = False, nsd_tol: float = 1.0,
                          hd_worst: Optional[float] = None, plot_file: Optional[str] = None,
                          progress: bool = True, output_file: Optional[str] = None) -> Tuple[dict, str]:
    """Read nnU-Net's ``summary_file``, add CC metrics, write ``output_file`` (default: the same file) and the
    per-component CSV next to it. Returns (summary, csv path)."""
    import json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnx.io_utils import atomic_write_json
    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    results = evaluate_cc_folder(ref, pred, dataset_json, rw_name, labels, lm.ignore_label, voxel_units, nsd_tol,
                                 hd_worst, num_processes, progress)
    with open(summary_file) as f:
        summary = json.load(f)
    merge_into_summary(summary, results)
    out = output_file or summary_file
    atomic_write_json(summary, out)
    csv_path = os.path.splitext(out)[0] + "_components.csv"
    write_components_csv(results, csv_path)
    if plot_file:
        plot(results, summary, plot_file)
    return summary, csv_path


def cc_after_validation(fold_folder: str, preprocessed_dataset_base: str, dataset_json: dict, rw_name: str,
                        num_processes: int = 1) -> Optional[str]:
    """After nnU-Net's final validation of a fold: ``validation/summary_cc.json`` (nnU-Net's summary + CC metrics)
    and ``validation/summary_cc_components.csv``. nnU-Net's own summary.json is left untouched."""
    val = os.path.join(fold_folder, "validation")
    summary = os.path.join(val, "summary.json")
    if not os.path.isfile(summary):
        return None
    out = os.path.join(val, "summary_cc.json")
    cc_summary_for_folder(os.path.join(preprocessed_dataset_base, "gt_segmentations"), val, dataset_json, summary,
                          rw_name, num_processes, progress=False, output_file=out)
    return out
