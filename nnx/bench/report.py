"""results.json, results.md and the PNG plots of a benchmark."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from nnx.bench import stats


def accuracy_summary(per_run: Dict[str, List[Dict[str, Any]]], references: Dict[str, Dict[str, Any]],
                     baseline: str) -> Dict[str, Dict[str, Any]]:
    """arm -> {dice, cc_dice, per_class: mean/std/values over seeds; deltas to the baseline}; references too."""
    rows: Dict[str, Dict[str, Any]] = {}
    for arm, recs in per_run.items():
        classes = sorted({c for r in recs for c in r["per_class_dice"]})
        rows[arm] = {"kind": "arm", "seeds": [r["seed"] for r in recs],
                     "dice": stats.mean_std([r["dice"] for r in recs]),
                     "cc_dice": stats.mean_std([r["cc_dice"] for r in recs]),
                     "per_class_dice": {c: stats.mean_std([r["per_class_dice"].get(c) for r in recs])
                                        for c in classes}}
    for name, rec in references.items():
        rows[name] = {"kind": "reference", "seeds": [],
                      "dice": stats.mean_std([rec["dice"]]), "cc_dice": stats.mean_std([rec["cc_dice"]]),
                      "per_class_dice": {c: stats.mean_std([v]) for c, v in rec["per_class_dice"].items()}}
    base = rows.get(baseline)
    for name, row in rows.items():
        for metric in ("dice", "cc_dice"):
            row[f"{metric}_vs_baseline"] = stats.delta(row[metric], base[metric], row["kind"] == "reference",
                                                       base["kind"] == "reference") if base else None
    return rows


def _f(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _ms(m: Dict[str, Any]) -> str:
    if m["mean"] is None:
        return "n/a"
    return f"{m['mean']:.3f} ± {m['std']:.3f}" if m["std"] is not None else f"{m['mean']:.3f}"


def _delta(d: Optional[Dict[str, Any]]) -> str:
    if not d or d["delta"] is None:
        return "—"
    flag = {True: " *", False: "", None: " (1 seed)"}[d["exceeds_spread"]]
    return f"{d['delta']:+.3f}{flag}"


def accuracy_markdown(rows: Dict[str, Dict[str, Any]], baseline: str, n_seeds: int) -> str:
    classes = sorted({c for r in rows.values() for c in r["per_class_dice"]})
    head = ["arm", "Dice", f"Δ vs {baseline}", "CC-Dice", f"Δ vs {baseline}"] + [f"Dice {c}" for c in classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        label = f"{name} (reference)" if r["kind"] == "reference" else name
        cells = [label, _ms(r["dice"]), _delta(r["dice_vs_baseline"]) if name != baseline else "baseline",
                 _ms(r["cc_dice"]), _delta(r["cc_dice_vs_baseline"]) if name != baseline else "baseline"]
        cells += [_f(r["per_class_dice"][c]["mean"]) if c in r["per_class_dice"] else "n/a" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± standard deviation over {n_seeds} seed(s) (foreground mean over classes, test cases). "
                 "`*`: the delta exceeds the seed spread sqrt(sd_arm² + sd_baseline²). References are folders "
                 "evaluated as predictions (no training).")
    return "\n".join(lines)


def speed_markdown(table: Dict[str, Dict[str, Any]], stock: str, mode: str,
                   predict: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    head = ["arm", "trainer", "s/iter", "ratio", "data s/iter", "infer s/patch", "ratio", "peak GB", "ratio",
            "static GB"]
    if predict:
        head += ["predict s/case", "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in table.items():
        if r.get("error") and r.get("s_per_iter") is None:
            lines.append(f"| {name} | {r['trainer']} | failed: {r['error'][:120]} |" + " |" * (len(head) - 3))
            continue
        cells = [name, r["trainer"], _f(r["s_per_iter"]), _f(r["speed_ratio"], "{:.2f}x"),
                 _f(r["data_s_per_iter"]), _f(r["infer_s_per_patch"], "{:.4f}"),
                 _f(r["inference_ratio"], "{:.2f}x"), _f(r["peak_gb"]), _f(r["memory_ratio"], "{:.2f}x"),
                 _f(r["static_gb"], "{:.4f}")]
        if predict:
            p = predict.get(name, {})
            cells += [_f(p.get("s_per_case")), _f(p.get("ratio"), "{:.2f}x")]
        lines.append("| " + " | ".join(cells) + " |")
    method = next((r.get("memory_method") for r in table.values() if r.get("memory_method")), "n/a")
    lines.append("")
    lines.append(f"Ratios against {stock}, measured in the same run ({mode}: "
                 + ("rounds of training steps alternate between the arms" if mode == "interleaved" else
                    "arms measured one after the other, NOT interleaved") +
                 "). s/iter: next batch + train_step (median); data: batch loading and augmentation part. "
                 f"infer: one forward pass on one patch in eval mode. Peak memory: {method}; static: parameters, "
                 "buffers and optimizer state of the trainer's modules.")
    return "\n".join(lines)


def plot_accuracy(path: str, rows: Dict[str, Dict[str, Any]]) -> None:
    plt = _pyplot()
    import numpy as np
    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.38
    for j, metric in enumerate(("dice", "cc_dice")):
        means = [rows[n][metric]["mean"] or 0.0 for n in names]
        errs = [rows[n][metric]["std"] or 0.0 for n in names]
        x = np.arange(len(names)) + (j - 0.5) * width
        ax.bar(x, means, width, yerr=errs, capsize=3, label={"dice": "Dice", "cc_dice": "CC-Dice"}[metric],
               alpha=0.85)
        for xi, n in zip(x, names):
            vals = rows[n][metric]["values"]
            ax.scatter([xi] * len(vals), vals, s=9, color="k", zorder=3)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([n + (" (ref.)" if rows[n]["kind"] == "reference" else "") for n in names], fontsize=8,
                       rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("foreground mean, test cases")
    ax.legend(fontsize=8)
    ax.set_title("accuracy (bars: mean ± sd over seeds; dots: seeds)", fontsize=9)
    _save(fig, path)


def plot_overhead(path: str, table: Dict[str, Dict[str, Any]], stock: str) -> None:
    plt = _pyplot()
    import numpy as np
    names = [n for n, r in table.items() if r.get("s_per_iter") is not None]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 3.6))
    width = 0.27
    for j, (key, label) in enumerate((("speed_ratio", "s/iter"), ("memory_ratio", "peak memory"),
                                      ("inference_ratio", "inference"))):
        vals = [table[n].get(key) or 0.0 for n in names]
        ax.bar(np.arange(len(names)) + (j - 1) * width, vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names, fontsize=8, rotation=20, ha="right")
    ax.set_ylabel(f"ratio to {stock}")
    ax.legend(fontsize=8)
    ax.set_title("cost relative to the stock trainer (same plans, same run)", fontsize=9)
    _save(fig, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcdefaults()  # nnU-Net imports seaborn, which changes the global style
    return plt


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
