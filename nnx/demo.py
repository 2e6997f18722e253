"""``nnx_demo``: the whole nnx cycle on a phantom, CPU only, in minutes.

phantom (nnx_synth) -> plan + preprocess (nnx_plan) -> train the stock nnUNetTrainer and one plugin trainer
(same plans, same data, same iterations) -> predict the held-out cases -> evaluate -> comparison table + PNG figure.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List

from nnx.errors import ArgumentParser, NNXError, cli_entry

ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
PRESETS = {
    # phantom (nnx_synth preset + case counts), epochs, iterations per epoch, validation iterations per epoch.
    # Sized for 2 CPU cores: one iteration at the tiny preset's 28x56x56 patch takes about 1 s, at the small
    # preset's 40x80x80 about 4 s, so the default demo keeps the tiny geometry and adds cases and iterations.
    "quick": dict(preset="tiny", synth={}, epochs=3, iters=5, val_iters=1),
    "default": dict(preset="tiny", synth={"num_train": 16, "num_test": 6}, epochs=12, iters=15, val_iters=2),
}


def setup_workspace(workspace: str | None) -> str:
    """Use the nnUNet_* env vars if set, else ./nnx_workspace (or --workspace)."""
    present = [v for v in ENV_VARS if os.environ.get(v)]
    if workspace is None and len(present) == len(ENV_VARS):
        print("nnx_demo: using your nnUNet_raw / nnUNet_preprocessed / nnUNet_results")
        return os.path.dirname(os.path.abspath(os.environ["nnUNet_results"]))
    if workspace is None and present:
        raise NNXError(f"only some nnUNet_* variables are set ({', '.join(present)}): set all three or none")
    ws = os.path.abspath(workspace or "nnx_workspace")
    for var, sub in zip(ENV_VARS, ("raw", "preprocessed", "results")):
        os.environ[var] = os.path.join(ws, sub)
        os.makedirs(os.environ[var], exist_ok=True)
    print(f"nnx_demo: nnUNet_* environment variables are not set; using the workspace {ws}")
    return ws


def train_briefly(dataset_name: str, trainer_name: str, plans: str, epochs: int, iters: int, val_iters: int,
                  device) -> Dict[str, float]:
    """Train one trainer through nnU-Net's own name lookup (shim) and loop; returns timing figures."""
    from nnx import options as nnx_options
    from nnx.ext_path import ensure_ext_trainer_env
    from nnx.registry import is_nnx_trainer, load_trainer
    from nnunetv2.run.run_training import get_trainer_from_args

    ensure_ext_trainer_env()
    cls = load_trainer(trainer_name)
    raw = {"epochs": str(epochs), "iters_per_epoch": str(iters), "val_iters": str(val_iters), "save_every": "1000"}
    values = nnx_options.resolve(cls, raw, "nnx_demo")
    os.environ[nnx_options.ENV_VAR] = " ".join(f"{k}={v}" for k, v in raw.items())
    os.environ[nnx_options.SOURCE_ENV_VAR] = "nnx_demo"
    trainer = get_trainer_from_args(dataset_name, "3d_fullres", 0, trainer_name, plans, False, device)
    if not is_nnx_trainer(cls):
        nnx_options.apply(trainer, values, "nnx_demo")
    t0 = time.time()
    trainer.run_training()
    wall = time.time() - t0
    return {"train_s": wall, "steps": epochs * iters, "s_per_step": wall / max(1, epochs * iters)}


def per_class_dice(summary: dict, labels: Dict[str, int]) -> Dict[str, float]:
    from nnx.bench.runner import metrics_from_summary
    m = metrics_from_summary(summary, labels)
    return {**m["per_class_dice"], "mean": m["dice"]}


def format_table(results: Dict[str, Dict[str, float]], timing: Dict[str, Dict[str, float]]) -> str:
    classes = list(next(iter(results.values())).keys())
    head = f"{'trainer':<18}" + "".join(f"{c:>10}" for c in classes) + f"{'s/iter':>9}{'ratio':>7}"
    rows = [head, "-" * len(head)]
    base = None
    for tr, dice in results.items():
        sps = timing[tr]["s_per_step"]
        base = base or sps
        rows.append(f"{tr:<18}" + "".join(f"{dice[c]:>10.3f}" for c in classes) + f"{sps:>9.2f}{sps / base:>7.2f}")
    return "\n".join(rows)


def make_figure(path: str, images_dir: str, labels_dir: str, pred_dirs: Dict[str, str], cases: List[str],
                results: Dict[str, Dict[str, float]], file_ending: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk
    plt.rcdefaults()  # nnU-Net imports seaborn, which changes the global style

    def load(p):
        return sitk.GetArrayFromImage(sitk.ReadImage(p))

    ncols = 2 + len(pred_dirs)
    fig, axes = plt.subplots(len(cases) + 1, ncols, figsize=(3.2 * ncols, 3.2 * (len(cases) + 1)))
    axes = np.atleast_2d(axes)
    for r, case in enumerate(cases):
        img = load(os.path.join(images_dir, f"{case}_0000{file_ending}"))
        gt = load(os.path.join(labels_dir, case + file_ending))
        fg = np.argwhere(gt > 0)
        z = int(np.median(fg[:, 0])) if len(fg) else img.shape[0] // 2
        body = img[img > np.percentile(img, 30)]  # window on the body, not the air around it
        lo, hi = np.percentile(body, (1, 99))
        panels = [("image", None), ("reference", gt)] + [(tr, load(os.path.join(d, case + file_ending)))
                                                        for tr, d in pred_dirs.items()]
        for c, (title, seg) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img[z], cmap="gray", vmin=lo, vmax=hi)
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg[z], 0), cmap="tab10", vmin=0, vmax=9, alpha=0.5,
                          interpolation="nearest")
            ax.set_title(f"{case}: {title}" if c < 2 else title, fontsize=9)
            ax.axis("off")
    for ax in axes[-1]:
        ax.axis("off")
    ax = fig.add_subplot(len(cases) + 1, 1, len(cases) + 1)
    classes = list(next(iter(results.values())).keys())
    width = 0.8 / len(results)
    for i, (tr, dice) in enumerate(results.items()):
        ax.bar(np.arange(len(classes)) + i * width, [dice[c] for c in classes], width, label=tr)
    ax.set_xticks(np.arange(len(classes)) + width * (len(results) - 1) / 2)
    ax.set_xticklabels(classes, fontsize=9)
    ax.set_ylabel("mean Dice, test cases", fontsize=9)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


@cli_entry("nnx_demo")
def main(argv):
    p = ArgumentParser(prog="nnx_demo", description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny phantom, a few iterations (about 2 minutes)")
    p.add_argument("--trainer", default="RotNPCTrainer", help="plugin trainer to compare (default RotNPCTrainer)")
    p.add_argument("--workspace", default=None, help="workspace folder (default: nnUNet_* env vars, else "
                   "./nnx_workspace)")
    p.add_argument("-d", type=int, default=990, help="dataset id of the phantom (default 990)")
    p.add_argument("--epochs", type=int, default=None, help="override epochs")
    p.add_argument("--iters", type=int, default=None, help="override iterations per epoch")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    args = p.parse_args(argv)
    t_start = time.time()
    cfg = dict(PRESETS["quick" if args.quick else "default"])
    cfg["epochs"] = args.epochs or cfg["epochs"]
    cfg["iters"] = args.iters or cfg["iters"]

    from nnx.registry import load_trainer
    load_trainer(args.trainer)
    ws = setup_workspace(args.workspace)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    import torch
    from nnx.cli.common import cpu_threads
    torch.set_num_threads(cpu_threads())
    device = torch.device("cpu")

    from nnx.synth import make_dataset
    print(f"[1/5] phantom: preset {cfg['preset']} {cfg['synth'] or ''}, seed {args.seed}")
    report = make_dataset(args.d, preset=cfg["preset"], seed=args.seed, overwrite=True, **cfg["synth"])
    print(report.format())
    dataset_name = os.path.basename(report.folder)

    import shutil
    for var in ("nnUNet_preprocessed", "nnUNet_results"):  # the demo's own dataset: no stale splits or models
        shutil.rmtree(os.path.join(os.environ[var], dataset_name), ignore_errors=True)
    from nnx.cli.plan import plan_dataset
    print("[2/5] plan + preprocess (3d_fullres)")
    plans = plan_dataset(dataset_name, ["3d_fullres"], num_processes=1, clean=True)
    os.environ["nnUNet_n_proc_DA"] = "0"  # training only: no benefit from augmentation workers on 2 cores

    trainers = ["nnUNetTrainer", args.trainer]
    timing = {}
    for tr in trainers:
        print(f"[3/5] train {tr}: {cfg['epochs']} epochs x {cfg['iters']} iterations, CPU")
        timing[tr] = train_briefly(dataset_name, tr, plans, cfg["epochs"], cfg["iters"], cfg["val_iters"], device)

    from nnx.cli.evaluate import evaluate_folder
    from nnx.cli.predict import model_folder, predict_folder
    from nnx.io_utils import atomic_write_json, read_json
    raw = report.folder
    dataset_json = read_json(os.path.join(raw, "dataset.json"), "dataset.json")
    results, pred_dirs = {}, {}
    for tr in trainers:
        print(f"[4/5] predict imagesTs with {tr} (no test-time mirroring) and evaluate")
        out = os.path.join(ws, "demo_predictions", tr)
        t0 = time.time()
        predict_folder(os.path.join(raw, "imagesTs"), out, model_folder(dataset_name, tr, plans, "3d_fullres"),
                       [0], "checkpoint_final.pth", device, tta=False, progress=False)
        n_cases = len([f for f in os.listdir(out) if f.endswith(dataset_json["file_ending"])])
        timing[tr]["predict_s_per_case"] = (time.time() - t0) / max(1, n_cases)
        summary = evaluate_folder(os.path.join(raw, "labelsTs"), out, dataset_json, os.path.join(out, "summary.json"))
        results[tr] = per_class_dice(summary, dataset_json["labels"])
        pred_dirs[tr] = out

    print("[5/5] results (Dice on the held-out test cases)")
    table = format_table(results, timing)
    print(table)
    print("s/iter: training wall time per iteration, including nnU-Net's per-epoch validation; ratio to "
          "nnUNetTrainer measured in this run")
    cases = sorted(f[: -len(dataset_json["file_ending"])] for f in os.listdir(os.path.join(raw, "labelsTs"))
                   if f.endswith(dataset_json["file_ending"]))[:2]
    fig = os.path.join(ws, "nnx_demo.png")
    make_figure(fig, os.path.join(raw, "imagesTs"), os.path.join(raw, "labelsTs"), pred_dirs, cases, results,
                dataset_json["file_ending"])
    atomic_write_json({"dataset": dataset_name, "plans": plans, "config": cfg, "dice": results, "timing": timing,
                       "wall_s": time.time() - t_start}, os.path.join(ws, "nnx_demo_results.json"))
    print(f"nnx_demo: figure {fig}, results {os.path.join(ws, 'nnx_demo_results.json')}, "
          f"wall time {time.time() - t_start:.0f} s")
    print("Note: a few CPU iterations show the pipeline, not the methods' accuracy; use nnx_bench for comparisons.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
