"""``nnx_plan``: validate the raw dataset, fingerprint, plan (for the trainer that will run), preprocess.

Without ``-tr``/``-gpu_memory_target``/``-device cpu`` the plans are nnU-Net's own (``nnUNetPlans``, or the ResEnc
preset's). With any of them, nnx plans for the trainer's memory profile under the budget (:mod:`nnx.planning`)
and writes a distinct plans identifier (``nnxPlans_<Trainer>_<budget>GB``) that ``nnx_train -p`` takes.
``--measure`` runs a few real training steps and records peak memory next to the prediction; ``--calibrate``
fits the trainer's profile from such measurements; ``--table`` prints plans for every registered trainer and budget.
"""
from __future__ import annotations

import contextlib
import os
import time

from nnx.errors import ArgumentParser, NNXError, cli_entry

FINGERPRINT_SAMPLES_ENV = "NNX_FINGERPRINT_SAMPLES"
PLANNERS = {"default": "ExperimentPlanner", "ResEncM": "nnUNetPlannerResEncM",
            "ResEncL": "nnUNetPlannerResEncL", "ResEncXL": "nnUNetPlannerResEncXL"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_plan", description="Check, fingerprint, plan and preprocess datasets.")
    p.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s)")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres"],
                   help="configurations to preprocess (default: 2d 3d_fullres 3d_lowres)")
    p.add_argument("-tr", default=None, help="plan for this trainer's memory profile (see nnx_trainers); without "
                   "-tr, -gpu_memory_target and -device cpu the plans are nnU-Net's own")
    p.add_argument("-pl", default="default", choices=sorted(PLANNERS), help="planner preset (default: default)")
    p.add_argument("-gpu_memory_target", type=float, default=None,
                   help="GPU memory budget in GB (default: the preset's, 8 for default)")
    p.add_argument("-device", default="cuda", choices=["cuda", "cpu"],
                   help="plan for a GPU budget (cuda, default) or for training in minutes on a CPU (cpu)")
    p.add_argument("-overwrite_plans_name", default=None, help="plans identifier to write")
    p.add_argument("-np", type=int, default=None, help="processes for fingerprinting and preprocessing "
                   "(default: nnUNet_def_n_proc or 8)")
    p.add_argument("--verify_dataset_integrity", action="store_true",
                   help="also run nnU-Net's own integrity check")
    p.add_argument("--no-preprocess", dest="no_preprocess", action="store_true", help="plan only")
    p.add_argument("--clean", action="store_true", help="recompute the fingerprint even if it exists")
    p.add_argument("--fingerprint-samples", dest="fingerprint_samples", type=int, default=None, metavar="N",
                   help="foreground voxels sampled in total for the intensity statistics of a new fingerprint "
                   f"(default: ${FINGERPRINT_SAMPLES_ENV}, else nnU-Net's 1e8, ~30 s even for a tiny dataset)")
    p.add_argument("--measure", action="store_true", help="run a few real training steps of the trainer per "
                   "planned configuration on -device and record peak memory next to the prediction")
    p.add_argument("--calibrate", action="store_true", help="measure the trainer and the stock trainer at two "
                   "batch sizes and store the fitted profile factors (used by later planning on this device kind)")
    p.add_argument("--steps", type=int, default=3, help="measured training steps for --measure/--calibrate (3)")
    p.add_argument("--table", action="store_true", help="print patch, batch, predicted (and measured) memory for "
                   "every registered trainer at 4/8/16/24/40/80 GB (3d_fullres; needs a fingerprint)")
    return p


def fingerprint_samples(value=None):
    """Foreground voxels sampled for the fingerprint's intensity statistics: ``value``, else
    ``$NNX_FINGERPRINT_SAMPLES``, else None (nnU-Net's own 1e8, drawn with replacement whatever the dataset's size:
    ~30 s and ~2 GB of RAM for 8 tiny volumes). Fewer samples give the same statistics up to sampling noise."""
    source = "--fingerprint-samples"
    if value is None:
        raw = os.environ.get(FINGERPRINT_SAMPLES_ENV, "").strip()
        if not raw:
            return None
        source = FINGERPRINT_SAMPLES_ENV
        try:
            value = int(float(raw))
        except ValueError:
            raise NNXError(f"{source} must be a number of voxels, got '{raw}'") from None
    if value < 1000:
        raise NNXError(f"{source} must be >= 1000, got {value}")
    return int(value)


def extract_fingerprint(dataset_id: int, num_processes: int, clean: bool, samples=None) -> None:
    """nnU-Net's DatasetFingerprintExtractor (what nnUNetv2_plan_and_preprocess runs), with ``samples`` foreground
    voxels in total for the intensity statistics when given."""
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    fpe = DatasetFingerprintExtractor(dataset_id, num_processes, verbose=False)
    fpe.show_progress_bar = False
    if samples is not None:
        fpe.num_foreground_voxels_for_intensitystats = samples
    fpe.run(overwrite_existing=clean)


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


def nnx_planning(trainer=None, gpu_memory_target=None, device: str = "cuda", measured: bool = False) -> bool:
    """Whether nnx_plan writes nnx plans (its own identifier) rather than nnU-Net's own."""
    return trainer is not None or gpu_memory_target is not None or device == "cpu" or measured


def plan_dataset(dataset_name: str, configurations, planner: str = "default", gpu_memory_target=None,
                 plans_name=None, num_processes=None, verify=False, preprocess=True, clean=False,
                 trainer=None, device: str = "cuda", measure: bool = False, calibrate: bool = False,
                 steps: int = 3, fingerprint_samples_total=None) -> str:
    """Python API of nnx_plan. Returns the plans identifier."""
    from nnx import checks
    from nnx.cli.common import default_processes
    from nnx.registry import trainer_target

    if trainer is not None:
        trainer_target(trainer)  # unknown trainer -> clear error before any work (no import)
        from nnx.planning import preload_trainer
        preload_trainer(trainer)  # its import overlaps with the checks and fingerprinting
    if gpu_memory_target is not None and gpu_memory_target <= 0:
        raise NNXError(f"-gpu_memory_target must be > 0 GB, got {gpu_memory_target:g}")
    nnx_mode = nnx_planning(trainer, gpu_memory_target, device, measure or calibrate)
    if (measure or calibrate) and not preprocess:
        raise NNXError("--measure/--calibrate train on preprocessed data: drop --no-preprocess")
    if (measure or calibrate) and device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise NNXError("--measure/--calibrate on cuda, but torch sees no CUDA device here; use -device cpu "
                           "(CPU plans, CPU measurements) or run on a GPU machine")
    samples = fingerprint_samples(fingerprint_samples_total)
    raw_folder = os.path.join(os.environ["nnUNet_raw"], dataset_name)
    t0 = time.time()
    summary = checks.check_raw_dataset(raw_folder, num_processes=1)
    print(f"nnx_plan: {dataset_name}: dataset checked ({summary.get('cases', '?')} training cases, "
          f"{time.time() - t0:.1f} s)")
    n = num_processes or default_processes()
    dataset_id = int(dataset_name[7:10])
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments
    with _planning_safe_env():
        if verify:
            from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
            verify_dataset_integrity(raw_folder, n)
        fp = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, "dataset_fingerprint.json")
        if clean or not os.path.isfile(fp):
            t1 = time.time()
            extract_fingerprint(dataset_id, n, True, samples)
            print(f"nnx_plan: {dataset_name}: fingerprint extracted ("
                  f"{'nnU-Net default' if samples is None else samples} foreground samples, {time.time() - t1:.1f} s)")
        if nnx_mode:
            from nnx.planning import plan_for_trainer
            plans_identifier, plans = plan_for_trainer(dataset_name, trainer or "nnUNetTrainer", gpu_memory_target,
                                                       planner, device, plans_name)
            print(format_plans(plans, plans_identifier))
        else:
            plans_identifier = plan_experiments([dataset_id], PLANNERS[planner], gpu_memory_target,
                                                overwrite_plans_name=plans_name)
        if preprocess:
            stock_seconds = _preprocess(dataset_name, dataset_id, plans_identifier, configurations, n)
            _preprocess_nnx_inputs(dataset_name, plans_identifier, configurations, n, stock_seconds,
                                   summary.get("case_ids", []))
    if measure:
        measure_plans(dataset_name, plans_identifier, configurations, trainer or "nnUNetTrainer", device, steps)
    if calibrate:
        calibrate_trainer(dataset_name, plans_identifier, trainer or "nnUNetTrainer", device, steps)
    return plans_identifier


def _preprocess(dataset_name, dataset_id, plans_identifier, configurations, n) -> dict:
    """nnU-Net's preprocessing per configuration, skipped where another plans file already preprocessed the same
    data (same data identifier, spacing, normalisation, resampling) completely."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as stock_preprocess
    stock_seconds = {}
    for cfg in configurations:  # one at a time: the extras report compares with each one's time
        reuse = _reusable_data(dataset_name, plans_identifier, cfg)
        if reuse:
            print(f"nnx_plan: {dataset_name}: {cfg}: reusing preprocessed data {reuse} (same spacing and "
                  f"normalisation)")
            continue
        t1 = time.perf_counter()
        stock_preprocess([dataset_id], plans_identifier, [cfg], [n], show_progress_bar=False)
        stock_seconds[cfg] = time.perf_counter() - t1
    return stock_seconds


def _reusable_data(dataset_name: str, plans_identifier: str, cfg: str):
    import json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnx.planning import preprocessed_data, preprocessing_signature
    base = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name)
    with open(os.path.join(base, plans_identifier + ".json")) as f:
        plans = json.load(f)
    if cfg not in plans["configurations"]:
        return None
    cm = PlansManager(plans).get_configuration(cfg)
    folder = os.path.join(base, cm.data_identifier)
    if not os.path.isdir(folder):
        return None
    with open(os.path.join(base, "dataset.json")) as f:
        n_train = json.load(f)["numTraining"]
    n_have = len([x for x in os.listdir(folder) if x.endswith(".pkl")])
    if n_have != n_train:
        return None
    mine = (preprocessing_signature(plans, cm.configuration), cm.data_identifier)
    return cm.data_identifier if mine in preprocessed_data(dataset_name, exclude=plans_identifier) else None


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


def format_plans(plans: dict, plans_identifier: str) -> str:
    nx = plans.get("nnx", {})
    head = (f"nnx_plan: plans '{plans_identifier}' for {nx.get('trainer')} on "
            + ("CPU" if nx.get("device") == "cpu" else f"{nx.get('budget_gb'):g} GB")
            + f" (profile: x{nx.get('profile', {}).get('activation_factor', 1):g} activations + "
              f"{nx.get('profile', {}).get('static_gb', 0):g} GB static, {nx.get('profile_source')})")
    lines = [head, f"  {'configuration':<20}{'patch':<18}{'batch':>6}{'predicted GB':>14}{'measured GB':>13}"]
    for name, cfg in plans["configurations"].items():
        if "patch_size" not in cfg:
            continue
        mem = cfg.get("nnx_memory", {})
        meas = mem.get("measured", {})
        m = next(iter(meas.values()))["peak_gb"] if meas else None
        lines.append(f"  {name:<20}{'x'.join(str(p) for p in cfg['patch_size']):<18}{cfg['batch_size']:>6}"
                     f"{mem.get('predicted_gb', float('nan')):>14.2f}" + (f"{m:>13.3f}" if m is not None else
                                                                            f"{'-':>13}"))
    if nx.get("note"):
        lines.append("  " + nx["note"])
    return "\n".join(lines)


def measure_plans(dataset_name, plans_identifier, configurations, trainer, device, steps) -> dict:
    """Probe peak memory of ``trainer`` per configuration and record it in the plans (``nnx_memory.measured``)."""
    import json
    from nnx.memory import device_kind
    from nnx.memory_probe import run_probe
    from nnx.planning import save_plans
    path = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, plans_identifier + ".json")
    with open(path) as f:
        plans = json.load(f)
    results = {}
    for cfg in configurations:
        if cfg not in plans["configurations"] or "patch_size" not in plans["configurations"][cfg]:
            continue
        t0 = time.time()
        r = run_probe(dataset_name, plans_identifier, cfg, trainer, device, steps)
        mem = plans["configurations"][cfg].setdefault("nnx_memory", {})
        mem.setdefault("measured", {})[device_kind(device)] = r
        results[cfg] = r
        pred = mem.get("predicted_gb")
        print(f"nnx_plan: measured {trainer} {cfg} on {device}: peak {r['peak_gb']:.3f} GB ({r['method']}), "
              f"predicted {pred if pred is not None else '-'} GB, {r['seconds_per_step']:.2f} s/step "
              f"({time.time() - t0:.0f} s)")
    save_plans(dataset_name, plans_identifier, plans)
    return results


def calibrate_trainer(dataset_name, plans_identifier, trainer, device, steps) -> dict:
    """Fit ``trainer``'s profile against the stock trainer on the same configuration and store it."""
    import json
    from nnx.memory import fit_profile, store_calibration
    from nnx.memory_probe import run_probe
    if trainer == "nnUNetTrainer":
        raise NNXError("--calibrate needs -tr TRAINER (the stock trainer is the reference)")
    path = os.path.join(os.environ["nnUNet_preprocessed"], dataset_name, plans_identifier + ".json")
    with open(path) as f:
        plans = json.load(f)
    cfg = "3d_fullres" if "3d_fullres" in plans["configurations"] else "2d"
    bs = int(plans["configurations"][cfg]["batch_size"])
    sizes = (bs, 2 * bs)
    points = {}
    for tr in ("nnUNetTrainer", trainer):
        points[tr] = []
        for b in sizes:
            r = run_probe(dataset_name, plans_identifier, cfg, tr, device, steps, b)
            points[tr].append((b, r["peak_gb"]))
            print(f"nnx_plan: calibrate {tr} {cfg} batch {b} on {device}: peak {r['peak_gb']:.3f} GB")
    fit = fit_profile(points["nnUNetTrainer"], points[trainer])
    entry = dict(fit, dataset=dataset_name, plans=plans_identifier, configuration=cfg,
                 patch_size=plans["configurations"][cfg]["patch_size"], points=points)
    where = store_calibration(trainer, device, entry)
    print(f"nnx_plan: {trainer} on {device}: activation_factor {fit['activation_factor']:g}, static "
          f"{fit['static_gb']:g} GB (stored in {where}; planning on this device kind uses it from now on)")
    return entry


def print_table(dataset_name: str, preset: str, device: str) -> None:
    """Plans (3d_fullres) for every registered trainer at the table budgets, with measured memory where any."""
    from nnx.memory import device_kind
    from nnx.planning import TABLE_BUDGETS, BudgetTooSmall, fullres_plan, plans_files
    from nnx.registry import load_trainer, trainer_names
    measured = {}
    for _, pl in plans_files(dataset_name):
        try:
            nx = pl.get("nnx") or {}
            for cfg in pl["configurations"].values():
                for m in (cfg.get("nnx_memory", {}).get("measured") or {}).values():
                    measured[(nx.get("trainer"), float(nx.get("budget_gb", 0)), tuple(cfg["patch_size"]),
                              m["device"])] = m["peak_gb"]
        except (KeyError, TypeError, AttributeError):
            continue
    budgets = (None,) if device == "cpu" else TABLE_BUDGETS
    print(f"nnx_plan: {dataset_name}: 3d_fullres plans per trainer and budget (planner {preset}, {device})")
    print(f"  {'trainer':<22}{'budget':>8}  {'patch':<16}{'batch':>6}{'predicted GB':>14}{'measured GB':>13}  profile")
    for name in trainer_names():
        cls = load_trainer(name)
        for b in budgets:
            bud = b if b is not None else 8.0
            try:
                r = fullres_plan(dataset_name, cls, bud, preset, device)
            except BudgetTooSmall:
                print(f"  {name:<22}{bud:>6g}GB  {'does not fit':<16}")
                continue
            m = [v for (t, bb, p, d), v in measured.items() if t == name and tuple(r["patch_size"]) == p
                 and device_kind(d) == device_kind(device) and (device == "cpu" or bb == bud)]
            lab = "cpu" if b is None else f"{bud:g}GB"
            print(f"  {name:<22}{lab:>8}  {'x'.join(map(str, r['patch_size'])):<16}{r['batch_size']:>6}"
                  f"{r['predicted_gb']:>14.2f}" + (f"{m[0]:>13.3f}" if m else f"{'-':>13}") + f"  {r['profile_source']}")


@cli_entry("nnx_plan")
def main(argv):
    args = build_parser().parse_args(argv)
    from nnx import checks
    checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
    if args.np is not None and args.np < 1:
        raise NNXError(f"-np must be >= 1, got {args.np}")
    if args.steps < 1:
        raise NNXError(f"--steps must be >= 1, got {args.steps}")
    names = [checks.resolve_dataset(d, where=("raw",)) for d in args.d]
    for name in names:
        t0 = time.time()
        if args.table:
            fp = os.path.join(os.environ["nnUNet_preprocessed"], name, "dataset_fingerprint.json")
            if not os.path.isfile(fp):
                raise NNXError("no fingerprint yet: run nnx_plan for the dataset first", fp)
            with _planning_safe_env():
                print_table(name, args.pl, args.device)
            continue
        pid = plan_dataset(name, args.c, args.pl, args.gpu_memory_target, args.overwrite_plans_name, args.np,
                           args.verify_dataset_integrity, not args.no_preprocess, args.clean, args.tr, args.device,
                           args.measure, args.calibrate, args.steps, args.fingerprint_samples)
        path = os.path.join(os.environ["nnUNet_preprocessed"], name, pid + ".json")
        print(f"nnx_plan: {name}: plans identifier '{pid}' written to {path} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
