"""``nnx_plan``: validate the raw dataset, then nnU-Net's fingerprint -> plan -> preprocess.

The dataset is checked by nnx first (one-line errors, nothing written on bad input). Until plugin-aware planning
lands, the plans are nnU-Net's own (``ExperimentPlanner``; ``-pl ResEncM|ResEncL|ResEncXL`` for the presets).
"""
from __future__ import annotations

import contextlib
import os
import time

from nnx.errors import ArgumentParser, NNXError, cli_entry

PLANNERS = {"default": "ExperimentPlanner", "ResEncM": "nnUNetPlannerResEncM",
            "ResEncL": "nnUNetPlannerResEncL", "ResEncXL": "nnUNetPlannerResEncXL"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_plan", description="Check, fingerprint, plan and preprocess datasets.")
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
                   help="configurations to preprocess (default: 2d 3d_fullres 3d_lowres)")
    p.add_argument("-tr", default="nnUNetTrainer", help="the trainer that will run (see nnx_trainers)")
    p.add_argument("-pl", default="default", choices=sorted(PLANNERS), help="planner preset (default: default)")
    p.add_argument("-gpu_memory_target", type=float, default=None, help="GPU memory target in GB")
    p.add_argument("-overwrite_plans_name", default=None, help="plans identifier to write")
    p.add_argument("-np", type=int, default=None, help="processes for fingerprinting and preprocessing "
                   "(default: nnUNet_def_n_proc or 8)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="also run nnU-Net's own integrity check")
    p.add_argument("--no-preprocess", dest="no_preprocess", action="store_true", help="plan only")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if it exists")
    return p


@contextlib.contextmanager
def _planning_safe_env():
    """nnU-Net planning calls torch.set_num_threads(nnUNet_n_proc_DA), which crashes for 0."""
    old = os.environ.get("nnUNet_n_proc_DA")
    if old is not None and old.strip() in ("0", ""):
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if old is not None:
            os.environ["nnUNet_n_proc_DA"] = old


def plan_dataset(dataset_name: str, configurations, planner: str = "default", gpu_memory_target=None,
                 plans_name=None, num_processes=None, verify=False, preprocess=True, clean=False,
                 trainer: str = "nnUNetTrainer") -> str:
    """Python API of nnx_plan. Returns the plans identifier."""
    from nnx import checks
    from nnx.cli.common import default_processes
    from nnx.registry import load_trainer

    load_trainer(trainer)  # unknown trainer -> clear error before any work
    raw_folder = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    t0 = time.time()
    summary = checks.check_raw_dataset(raw_folder, num_processes=1)
    print(f"nnx_plan: {dataset_name}: dataset checked ({summary.get('cases', '?')} training cases, "
          f"{time.time() - t0:.1f} s)")
    n = num_processes or default_processes()
    dataset_id = int(dataset_name[7:10])
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as stock_preprocess
    with _planning_safe_env():
        if verify:
            from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
            verify_dataset_integrity(raw_folder, n)
        fp = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset_fingerprint.json")
        extract_fingerprints([dataset_id], num_processes=n, clean=clean or not os.path.isfile(fp),
                             verbose=False, show_progress_bar=False)
        plans_identifier = plan_experiments([dataset_id], PLANNERS[planner], gpu_memory_target,
                                            overwrite_plans_name=plans_name)
        if preprocess:
            stock_seconds = {}
            for cfg in configurations:  # one at a time: the extras report compares with each one's time
                t1 = time.perf_counter()
                stock_preprocess([dataset_id], plans_identifier, [cfg], [n], show_progress_bar=False)
                stock_seconds[cfg] = time.perf_counter() - t1
            _preprocess_nnx_inputs(dataset_name, plans_identifier, configurations, n, stock_seconds,
                                   summary.get("case_ids", []))
    return plans_identifier


def _preprocess_nnx_inputs(dataset_name, plans_identifier, configurations, n, stock_seconds, case_ids) -> None:
    """Annotation tiers and auxiliary inputs (datasets with an ``nnx`` block), plus tier-aware splits."""
    from nnx.extras import preprocess_extras
    from nnx.fold_data import ensure_tiered_splits
    from nnx.tiers import DatasetSpec
    spec = DatasetSpec.from_folder(os.path.join(os.environ["nnUNet_raw"], dataset_name))
    if not spec.has_block:
        return
    t0 = time.time()
    reports = preprocess_extras(dataset_name, plans_identifier, configurations, n, verbose=True,
                                stock_seconds=stock_seconds)
    if reports:
        print(f"nnx_plan: {dataset_name}: tiers and auxiliary inputs preprocessed ({time.time() - t0:.1f} s)")
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    written = ensure_tiered_splits(base, case_ids, spec)
    if written:
        print(f"nnx_plan: {dataset_name}: {written} has 5 folds over the expert cases (non-expert tiers train only)")


@cli_entry("nnx_plan")
def main(argv):
    args = build_parser().parse_args(argv)
    from nnx import checks
    checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
    if args.np is not None and args.np < 1:
        raise NNXError(f"-np must be >= 1, got {args.np}")
    names = [checks.resolve_dataset(d, where=("raw",)) for d in args.d]
    for name in names:
        t0 = time.time()
        pid = plan_dataset(name, args.c, args.pl, args.gpu_memory_target, args.overwrite_plans_name, args.np,
                           args.verify_dataset_integrity, not args.no_preprocess, args.clean, args.tr)
        path = os.path.join(os.environ["nnUNet_preprocessed"], name, pid + ".json")
        print(f"nnx_plan: {name}: plans identifier '{pid}' written to {path} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
