"""Benchmark: nnx_plan against stock nnUNetv2_plan_and_preprocess on the same dataset, in one run.

    python -m nnx.benchmarks.planning [--preset tiny|small] [--id 870] [-np 2] [--rounds 2] [-tr nnUNetTrainer]

Writes a phantom, then alternates (fresh preprocessed folder each time) ``nnUNetv2_plan_and_preprocess -d ID -c
3d_fullres`` and ``nnx_plan -d ID -c 3d_fullres -tr TRAINER`` (dataset checks, fingerprint, plugin-aware plans,
preprocessing, tiers), as subprocesses, and prints each wall time, the ratio of the minima, and whether the
stock trainer's nnx plans equal nnU-Net's (every configuration: spacing, patch, batch, architecture).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def _run(cmd, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnx.benchmarks.planning", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    p.add_argument("--id", type=int, default=870)
    p.add_argument("-np", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("-tr", default="nnUNetTrainer")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="nnx_bench_plan_")
    env = dict(os.environ, nnUNet_raw=os.path.join(root, "raw"), nnUNet_preprocessed=os.path.join(root, "pp"),
               nnUNet_results=os.path.join(root, "res"), nnUNet_def_n_proc=str(args.np))
    env.pop("nnUNet_n_proc_DA", None)
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[k], exist_ok=True)
    os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
    try:
        from nnx.synth import make_dataset
        rep = make_dataset(args.id, preset=args.preset, seed=0, overwrite=True, num_processes=args.np)
        name = os.path.basename(rep.folder)
        pp = os.path.join(env["nnUNet_preprocessed"], name)
        bindir = os.path.dirname(sys.executable)
        stock_cmd = [os.path.join(bindir, "nnUNetv2_plan_and_preprocess"), "-d", str(args.id), "-c", "3d_fullres",
                     "-np", str(args.np), "-npfp", str(args.np)]
        nnx_cmd = [sys.executable, "-m", "nnx.cli.plan", "-d", str(args.id), "-c", "3d_fullres", "-tr", args.tr,
                   "-np", str(args.np)]
        times = {"stock": [], "nnx": []}
        for r in range(args.rounds):
            for which in (("stock", "nnx") if r % 2 == 0 else ("nnx", "stock")):
                shutil.rmtree(pp, ignore_errors=True)
                times[which].append(_run(stock_cmd if which == "stock" else nnx_cmd, env))
                if which == "stock":
                    with open(os.path.join(pp, "nnUNetPlans.json")) as f:
                        stock_plans = json.load(f)
                else:
                    pid = f"nnxPlans_{args.tr}_8GB"
                    with open(os.path.join(pp, pid + ".json")) as f:
                        nnx_plans = json.load(f)
        print(f"dataset {name} ({args.preset}), {args.np} processes, {args.rounds} rounds (alternating order)")
        for k, v in times.items():
            print(f"  {k:<6} " + "  ".join(f"{x:6.1f}s" for x in v) + f"   min {min(v):.1f}s")
        print(f"  nnx_plan / nnUNetv2_plan_and_preprocess = {min(times['nnx']) / min(times['stock']):.3f}")
        same = {c: {k: v for k, v in nnx_plans["configurations"][c].items() if k != "nnx_memory"} == cfg
                for c, cfg in stock_plans["configurations"].items()}
        print(f"  {args.tr} plans equal stock plans per configuration: {same}")
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
