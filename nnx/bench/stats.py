"""Summary statistics of a benchmark: means over seeds, deltas to the baseline, ratios to the stock trainer.

Rules (also written into results.json):

* ``std`` is the sample standard deviation over seeds (ddof = 1); with one seed it is undefined (None).
* ``delta`` = mean(arm) - mean(baseline); the seed spread of a delta is sqrt(std_arm^2 + std_baseline^2) (seeds
  are not paired: different trainers draw different random numbers from the same seed), and ``exceeds_spread`` is
  |delta| > that spread. With one seed it is None: one seed cannot tell a method from noise. References (folders
  evaluated as predictions) have std 0.
* Speed ratios are medians of per-round ratios to the stock arm measured in the same round (see
  :mod:`nnx.bench.measure`); memory and inference ratios divide the arm's figure by the stock arm's.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence

RULES = {
    "std": "sample standard deviation over seeds (ddof=1); None with one seed",
    "delta": "mean(arm) - mean(baseline)",
    "exceeds_spread": "|delta| > sqrt(std_arm^2 + std_baseline^2); None with one seed",
    "speed_ratio": "median over rounds of (arm's mean s/iter in the round / stock arm's in the same round); with "
                   "measure.group, the stock arm runs in every group and each arm is paired with its own group's",
    "memory_ratio": "peak(arm) / peak(stock arm), each measured in its own process",
    "inference_ratio": "median(arm) / median(stock arm)",
}


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def delta(arm: Dict[str, Optional[float]], base: Dict[str, Optional[float]],
          arm_is_reference: bool = False, base_is_reference: bool = False) -> Dict[str, Optional[float]]:
    """Delta of two :func:`mean_std` results and whether it exceeds the seed spread."""
    if arm["mean"] is None or base["mean"] is None:
        return {"delta": None, "spread": None, "exceeds_spread": None}
    d = arm["mean"] - base["mean"]
    sa = 0.0 if arm_is_reference else arm["std"]
    sb = 0.0 if base_is_reference else base["std"]
    if sa is None or sb is None:
        return {"delta": d, "spread": None, "exceeds_spread": None}
    spread = math.sqrt(sa ** 2 + sb ** 2)
    return {"delta": d, "spread": spread, "exceeds_spread": abs(d) > spread}


def median(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def round_ratio(arm_rounds: List[float], stock_rounds: List[float]) -> Optional[float]:
    """Median of per-round ratios (rounds paired by index)."""
    pairs = [a / s for a, s in zip(arm_rounds, stock_rounds) if s]
    return statistics.median(pairs) if pairs else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def speed_memory_table(measured: Dict[str, Dict], stock: str) -> Dict[str, Dict]:
    """Per arm: s/iter (median), data s/iter, speed ratio, inference s/patch and ratio, peak GB and ratio."""
    s = measured.get(stock, {})
    out = {}
    for name, m in measured.items():
        row = {"trainer": m.get("trainer"), "error": m.get("error")}
        if not m.get("error") or m.get("iter_s"):
            row.update({
                "s_per_iter": median(m.get("iter_s", [])),
                "data_s_per_iter": median(m.get("data_s", [])),
                "speed_ratio": round_ratio(m.get("round_iter_s", []),
                                           m.get("ref_round_iter_s", s.get("round_iter_s", []))),
                "infer_s_per_patch": median(m.get("infer_s", [])),
                "peak_gb": m.get("peak_gb"),
                "static_gb": m.get("static_gb"),
                "batch_size": m.get("batch_size"),
                "patch_size": m.get("patch_size"),
                "memory_method": m.get("memory_method"),
                # cores other processes kept busy during this arm's timed rounds (mean; nnx.bench.cpu_load)
                "other_cores": (sum(m["other_cores"]) / len(m["other_cores"])) if m.get("other_cores") else None,
                "cpus": m.get("cpus"),
            })
            row["inference_ratio"] = ratio(row["infer_s_per_patch"], median(s.get("infer_s", [])))
            row["memory_ratio"] = ratio(row["peak_gb"], s.get("peak_gb"))
        out[name] = row
    return out
