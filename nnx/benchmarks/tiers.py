"""Benchmark: preprocessing cost of annotation tiers / auxiliary inputs, and one training batch per tier.

    python -m nnx.benchmarks.tiers [--preset tiny|small|medium] [--id 880] [-np 2] [--keep]

Writes a phantom with every tier (expert, coarse, scribble, none), anatomy maps and PET as a train-only channel,
runs nnU-Net's fingerprint + plan, then in ONE run: nnU-Net's own preprocessing of the labeled images, and nnx's
preprocessing of each entry (same process count), and prints the time of each relative to the stock time
("1.05x" = stock + this entry takes 5 % longer than stock alone). Then it builds a trainer that requests every
entry and an unlabeled batch, and prints the entries and shapes of one batch per tier. Uses its own temporary
nnUNet_* folders unless --workdir is given.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnx.benchmarks.tiers", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--id", type=int, default=880)
    p.add_argument("-np", type=int, default=2, help="processes for stock and nnx preprocessing (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="timing repeats; the minimum is reported (default 2)")
    p.add_argument("--workdir", default=None, help="nnUNet_* root (default: a temporary folder, removed)")
    p.add_argument("--reuse", action="store_true", help="reuse the phantom already in --workdir (same id/preset)")
    args = p.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="nnx_bench_tiers_")
    for k in ("raw", "preprocessed", "results"):
        os.makedirs(os.path.join(root, k), exist_ok=True)
    os.environ.update({"nnUNet_raw": os.path.join(root, "raw"), "nnUNet_preprocessed": os.path.join(root, "preprocessed"),
                       "nnUNet_results": os.path.join(root, "results"), "nnUNet_n_proc_DA": "0",
                       "nnUNet_compile": "0", "nnUNet_def_n_proc": str(args.np)})
    try:
        return run(args)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


def run(args) -> int:
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess
    from nnx.extras import preprocess_extras
    from nnx.synth import make_dataset

    t0 = time.time()
    name = f"Dataset{args.id:03d}_Phantom{args.preset.capitalize()}"
    if not (args.reuse and os.path.isdir(os.path.join(os.environ["nnUNet_raw"], name))):
        rep = make_dataset(args.id, preset=args.preset, seed=0, tiers="expert=0.5,coarse=0.2,scribble=0.2,none=0.1",
                           pet="train_only", overwrite=True, num_processes=args.np)
        name = os.path.basename(rep.folder)
        print(f"phantom {name} ({args.preset}) written in {time.time() - t0:.1f} s")
    from nnx.cli.plan import _planning_safe_env, extract_fingerprint, fingerprint_samples
    with _planning_safe_env():  # nnU-Net planning crashes with nnUNet_n_proc_DA=0
        extract_fingerprint(args.id, args.np, True, fingerprint_samples())  # $NNX_FINGERPRINT_SAMPLES if set
        plans_id = plan_experiments([args.id], "ExperimentPlanner")
    stock_times, extra_times = [], []
    manifest = None
    for _ in range(max(1, args.repeats)):
        t1 = time.perf_counter()
        preprocess([args.id], plans_id, ["3d_fullres"], [args.np], show_progress_bar=False)
        stock_times.append(time.perf_counter() - t1)
        manifest = preprocess_extras(name, plans_id, ["3d_fullres"], args.np, verbose=False)["3d_fullres"]
        extra_times.append({"unlabeled": manifest["unlabeled"]["seconds"],
                            **{n: e["seconds"] for n, e in manifest["entries"].items()}})
    stock = min(stock_times)
    n_lab = len(manifest["labeled_cases"])
    print(f"\npreprocessing, 3d_fullres, {args.np} process(es), min of {len(stock_times)} run(s)")
    print(f"{'what':<26}{'cases':>6}{'wall s':>9}{'vs stock':>10}")
    print(f"{'stock nnU-Net (labeled)':<26}{n_lab:>6}{stock:>9.2f}{1.0:>9.2f}x")
    ps = manifest.get("pool_start_seconds", 0.0)
    if ps:
        print(f"{'nnx worker pool start':<26}{'':>6}{ps:>9.2f}{1 + ps / stock:>9.2f}x")
    label = {"unlabeled": "tier none (images)", "coarse": "coarse masks", "scribbles": "scribbles",
             "anatomy": "anatomy maps", "train_only": "train-only channels"}
    for k in extra_times[0]:
        s = min(e[k] for e in extra_times)
        n = len(manifest["unlabeled"]["cases"]) if k == "unlabeled" else len(manifest["entries"][k]["cases"])
        print(f"{label.get(k, k):<26}{n:>6}{s:>9.2f}{1 + s / stock:>9.2f}x")
    sc = manifest["entries"]["scribbles"]
    print(f"scribble voxels per class before {sc['voxels_before']}\n"
          f"                         after  {sc['voxels_after']} (cases losing a class: "
          f"{len(sc['cases_losing_a_class'])})")

    # one batch per tier
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx.trainer_base import nnxTrainer

    class AllEntries(nnxTrainer):
        nnx_requires = {"batch": ["coarse", "scribbles", "anatomy", "train_only", "unlabeled"],
                        "inputs": ["anatomy"]}

    pp = os.path.join(os.environ["nnUNet_preprocessed"], name)
    plans = load_json(os.path.join(pp, plans_id + ".json"))
    plans["continue_training"] = False
    tr = AllEntries(plans, "3d_fullres", 0, load_json(os.path.join(pp, "dataset.json")), torch.device("cpu"))
    tr.initialize()
    dl, _ = tr.get_dataloaders()
    shown = {}
    for _ in range(50):
        b = next(dl)
        for j, tier in enumerate(b["tiers"]):
            if tier not in shown:
                shown[tier] = (b, j)
        if "none" not in shown:
            shown["none"] = (b["unlabeled"], 0)
        if len(shown) == 4:
            break

    def desc(v):
        if isinstance(v, list) and v and torch.is_tensor(v[0]):
            return " + ".join(f"{tuple(x.shape)}" for x in v) + f" {v[0].dtype}"
        if torch.is_tensor(v):
            return f"{tuple(v.shape)} {v.dtype}"
        return None

    for tier in ("expert", "coarse", "scribble", "none"):
        if tier not in shown:
            print(f"\n{tier}: not drawn in 50 batches")
            continue
        b, j = shown[tier]
        print(f"\nbatch with a {tier} sample ({b['keys'][j]}):")
        for k, v in b.items():
            d = desc(v)
            if d:
                extra = ""
                if k in ("coarse", "scribbles", "anatomy") or k == "target":
                    x = v[0] if isinstance(v, list) else v
                    extra = f"  values in sample: {sorted(int(u) for u in torch.unique(x[j]))}"
                print(f"  {k:<11}{d}{extra}")
        if "unlabeled" in b:
            print(f"  unlabeled  {{{', '.join(f'{k}: {desc(v)}' for k, v in b['unlabeled'].items() if desc(v))}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
