"""``nnx_evaluate``: nnU-Net's metrics (Dice, IoU, TP/FP/FN, ...) plus CC-Metrics for a folder of predictions.

Writes the stock ``summary.json`` schema (readable by nnU-Net's ``load_summary_json``) with the connected-component
metrics as extra metric names (``CC_Dice``, ``CC_HD95``, ``CC_NSD``, ``CC_ASSD``, lesion detection counts; see
:mod:`nnx.cc_evaluation`), a per-component CSV next to it, and prints a table.
"""
from __future__ import annotations

import os
import tempfile
import time

from nnx.errors import ArgumentParser, NNXError, cli_entry


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_evaluate", description="Evaluate predictions against reference labels.")
    p.add_argument("-ref", required=True, help="folder with reference segmentations")
    p.add_argument("-pred", required=True, help="folder with predicted segmentations")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("-d", help="dataset name or id (dataset.json taken from nnUNet_raw or nnUNet_preprocessed)")
    g.add_argument("-djfile", help="path to dataset.json")
    p.add_argument("-pfile", default=None, help="plans.json (for the image reader; optional)")
    p.add_argument("-o", default=None, help="output summary.json (default: PRED/summary.json)")
    p.add_argument("-np", type=int, default=None, help="processes (default nnUNet_def_n_proc)")
    p.add_argument("--voxel-units", dest="voxel_units", action="store_true",
                   help="CC metrics in voxel units with the reference implementation's Voronoi tie rule "
                        "(CCMetrics parity); default: physical distances (mm)")
    p.add_argument("--nsd-tol", dest="nsd_tol", type=float, default=1.0,
                   help="surface Dice tolerance (mm, or voxels with --voxel-units; default 1)")
    p.add_argument("--hd-worst", dest="hd_worst", type=float, default=None,
                   help="HD95/ASSD of a missed component or an empty-reference false positive (default: the "
                        "volume diagonal)")
    p.add_argument("--no-cc", dest="no_cc", action="store_true", help="only nnU-Net's metrics")
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the summary (per-lesion Dice vs "
                   "lesion size; global Dice vs CC-Dice per case)")
    return p


def find_dataset_json(dataset: str) -> str:
    from nnx import checks
    name = checks.resolve_dataset(dataset, where=("raw", "preprocessed"))
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, name, "dataset.json")):
            return os.path.join(root, name, "dataset.json")
    raise NNXError(f"dataset.json of {name} not found in nnUNet_raw or nnUNet_preprocessed")


def evaluate_folder(ref: str, pred: str, dataset_json: dict, output_file: str, num_processes: int = 1,
                    reader_writer_name: str = None) -> dict:
    """Compute nnU-Net's metrics for every prediction in ``pred``; atomically write ``output_file``."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    ending = dataset_json["file_ending"]
    rw = recursive_find_reader_writer_by_name(reader_writer_name or reader_writer_for(pred, dataset_json))()
    lm = LabelManager(dataset_json["labels"], regions_class_order=dataset_json.get("regions_class_order"))
    labels = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    out_dir = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_summary_", suffix=".json", dir=out_dir)
    os.close(fd)
    try:
        result = compute_metrics_on_folder(ref, pred, tmp, rw, ending, labels, lm.ignore_label,
                                           num_processes=max(1, num_processes), chill=True)
        os.replace(tmp, output_file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return result


def reader_writer_for(pred: str, dataset_json: dict) -> str:
    """Name of the image reader/writer for the files of ``pred`` (dataset.json override, else by file)."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    ending = dataset_json["file_ending"]
    first = sorted(f for f in os.listdir(pred) if f.endswith(ending))[0]
    return determine_reader_writer_from_dataset_json(dataset_json, os.path.join(pred, first), verbose=False).__name__


def format_summary(result: dict, dataset_json: dict) -> str:
    names = {}
    for name, val in dataset_json["labels"].items():
        names[str(val if not isinstance(val, list) else tuple(val))] = name
    cc = "CC_Dice" in result["foreground_mean"]
    head = f"{'label':<20}{'Dice':>8}{'IoU':>8}{'n_ref':>10}{'n_pred':>10}"
    if cc:
        head += f"{'CC_Dice':>9}{'CC_HD95':>9}{'CC_NSD':>8}{'CC_ASSD':>9}{'TP':>6}{'FN':>6}{'FP/case':>9}"
    rows = [head]
    for key, m in result["mean"].items():
        k = str(key)
        row = f"{names.get(k, k):<20}{m['Dice']:>8.4f}{m['IoU']:>8.4f}{m['n_ref']:>10.0f}{m['n_pred']:>10.0f}"
        if cc and "CC_Dice" in m:
            n = len(result["metric_per_case"])
            row += (f"{m['CC_Dice']:>9.4f}{m['CC_HD95']:>9.2f}{m['CC_NSD']:>8.4f}{m['CC_ASSD']:>9.2f}"
                    f"{m['CC_TP'] * n:>6.0f}{m['CC_FN'] * n:>6.0f}{m['CC_FP']:>9.2f}")
        rows.append(row)
    fg = result["foreground_mean"]
    row = f"{'foreground mean':<20}{fg['Dice']:>8.4f}{fg['IoU']:>8.4f}"
    if cc:
        row += f"{'':>20}{fg['CC_Dice']:>9.4f}{fg['CC_HD95']:>9.2f}{fg['CC_NSD']:>8.4f}{fg['CC_ASSD']:>9.2f}"
    rows.append(row)
    return "\n".join(rows)


@cli_entry("nnx_evaluate")
def main(argv):
    args = build_parser().parse_args(argv)
    from nnx import checks
    from nnx.cli.common import default_processes
    from nnx.io_utils import read_json
    djfile = args.djfile or find_dataset_json(args.d)
    dataset_json = read_json(djfile, "dataset.json")
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or "file_ending" not in dataset_json:
        raise NNXError("dataset.json needs 'labels' and 'file_ending'", djfile)
    checks.check_prediction_folder(args.ref, args.pred, dataset_json["file_ending"], labels)
    rw_name = None
    if args.pfile:
        rw_name = read_json(args.pfile, "plans file").get("image_reader_writer")
    out = args.o or os.path.join(args.pred, "summary.json")
    if not out.endswith(".json"):
        raise NNXError("output file must end with .json", out)
    t0 = time.time()
    if args.nsd_tol < 0 or (args.hd_worst is not None and args.hd_worst <= 0):
        raise NNXError("--nsd-tol must be >= 0 and --hd-worst > 0")
    n = args.np or default_processes()
    rw_name = rw_name or reader_writer_for(args.pred, dataset_json)
    result = evaluate_folder(args.ref, args.pred, dataset_json, out, n, rw_name)
    if not args.no_cc:
        from nnx.cc_evaluation import cc_summary_for_folder
        png = os.path.splitext(out)[0] + "_cc.png" if args.plot else None
        result, csv_path = cc_summary_for_folder(args.ref, args.pred, dataset_json, out, rw_name, n,
                                                 args.voxel_units, args.nsd_tol, args.hd_worst, png)
        print(f"nnx_evaluate: per-component metrics in {csv_path}" + (f", figure {png}" if png else ""))
    print(format_summary(result, dataset_json))
    print(f"nnx_evaluate: {len(result['metric_per_case'])} case(s), summary written to {out} "
          f"({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
