"""Cross-validation splits over annotation tiers, and deterministic label-ratio settings.

* :func:`tiered_splits`: 5 folds over the **expert** cases (validation is always scored against expert labels);
  coarse- and scribble-tier cases are training-only in every fold. For a dataset whose cases are all expert this
  is exactly nnU-Net's own split (``generate_crossval_split(sorted cases, seed=12345)``).
* :func:`apply_label_ratio`: keep expert labels for ``N`` or ``X%`` of a fold's expert training cases and demote
  the others to ``coarse``, ``scribble`` or ``none``. The kept cases are the first ``k`` of one seeded permutation
  of the fold's sorted expert training cases, so the 10 % set is contained in the 20 % set and the same setting
  gives the same cases on every machine.

A fold's effective tiers are written by the trainer to ``fold_N/nnx_split.json``; ``nnx_plan --labeled`` writes them
into ``splits_final.json`` (key ``"nnx"`` of each fold, ignored by nnU-Net) where the stock ``"train"`` list
holds only cases whose label stock nnU-Net may use: stock trainers then train on the kept labels only.
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np

from nnx.errors import NNXError

SEED = 12345
DEMOTE_CHOICES = ("none", "coarse", "scribble")


def parse_labeled(value) -> Tuple[str, float]:
    """``"10%"`` -> ("percent", 10.0); ``"3"`` -> ("count", 3); ``"0"``/``"0%"`` -> ("count", 0) (every expert
    training case demoted); ``""``/None -> ("all", 0)."""
    if value is None or str(value).strip() in ("", "all", "100%"):
        return "all", 0.0
    v = str(value).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", v)
    if m:
        x = float(m.group(1))
        if not 0 <= x <= 100:
            raise NNXError(f"labeled={v}: the percentage must be in [0, 100]")
        return ("count", 0.0) if x == 0 else ("percent", x)
    if re.fullmatch(r"\d+", v):
        return "count", float(int(v))  # 0: every expert training case is demoted (e.g. to train on coarse masks)
    raise NNXError(f"labeled={v!r} must be a case count (e.g. 4) or a percentage (e.g. 10%)")


def tiered_splits(cases: Sequence[str], tiers: Dict[str, str], n_splits: int = 5, seed: int = SEED) -> List[dict]:
    """Folds over expert cases; other labeled tiers train in every fold (``tiers`` may omit expert cases)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    cases = sorted(cases)
    expert = [c for c in cases if tiers.get(c, "expert") == "expert"]
    others = [c for c in cases if tiers.get(c, "expert") in ("coarse", "scribble")]
    if len(expert) < n_splits:
        raise NNXError(f"{len(expert)} expert-labeled case(s) cannot make {n_splits} validation folds; "
                       f"provide a splits_final.json or train fold 'all'")
    splits = generate_crossval_split(expert, seed=seed, n_splits=n_splits)
    return [{"train": sorted(list(s["train"]) + others), "val": list(s["val"])} for s in splits]


def apply_label_ratio(train_keys: Sequence[str], tiers: Dict[str, str], labeled, demote_to: str,
                      fold_seed: int = SEED) -> Tuple[Dict[str, str], List[str]]:
    """Effective tier of every training case under a label-ratio setting, and the demoted cases (only expert
    cases are demoted)."""
    if demote_to not in DEMOTE_CHOICES:
        raise NNXError(f"demote_to={demote_to!r} must be one of {', '.join(DEMOTE_CHOICES)}")
    eff = {c: tiers.get(c, "expert") for c in train_keys}
    mode, x = parse_labeled(labeled)
    if mode == "all":
        return eff, []
    expert = sorted(c for c in train_keys if eff[c] == "expert")
    k = int(x) if mode == "count" else max(1, int(math.floor(len(expert) * x / 100 + 0.5)))
    if k > len(expert):
        raise NNXError(f"labeled={labeled}: the fold has only {len(expert)} expert-labeled training case(s)")
    order = np.random.RandomState(fold_seed).permutation(len(expert))
    demoted = sorted(expert[i] for i in order[k:])
    for c in demoted:
        eff[c] = demote_to
    return eff, demoted


def stock_train_keys(effective: Dict[str, str], demoted: Sequence[str]) -> List[str]:
    """Cases whose labelsTr file a stock trainer may train on: labeled tiers, minus demoted cases."""
    return sorted(c for c, t in effective.items() if t in ("expert", "coarse", "scribble") and c not in demoted)
