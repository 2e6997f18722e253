"""What one fold of one trainer trains on: effective tiers, case sets, entries and data sources.

Shared by nnx trainers (:mod:`nnx.trainer_base`) and by stock trainers run through ``nnx_train`` (label-ratio
settings). Everything is decided from the dataset's ``nnx`` block, the fold's split and the trainer's
``nnx_requires``, and written to ``fold_N/nnx_split.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from nnx.errors import NNXError
from nnx.extras import UNLABELED, extras_folder, load_manifest, plans_signature
from nnx.splits import SEED, apply_label_ratio, stock_train_keys, tiered_splits
from nnx.tiers import LABELED_TIERS, DatasetSpec

SPLIT_FILE = "nnx_split.json"
TARGET_ENTRY = {"coarse": "coarse", "scribble": "scribbles"}  # demoted tier -> entry that becomes the target


@dataclass
class FoldData:
    spec: DatasetSpec
    tiers: Dict[str, str]                 # effective tier of every training case (incl. unlabeled)
    demoted: List[str]
    train: List[str]                      # cases of the labeled loader
    val: List[str]
    unlabeled: List[str] = field(default_factory=list)
    target_from: Dict[str, str] = field(default_factory=dict)   # case -> entry that is its target
    labeled_setting: str = ""
    demote_to: str = "none"

    def to_json(self) -> dict:
        counts = {t: sum(1 for c in self.train if self.tiers.get(c) == t) for t in LABELED_TIERS}
        return {"labeled": self.labeled_setting or "all", "demote_to": self.demote_to,
                "train_labeled_by_tier": counts, "train": self.train, "val": self.val,
                "unlabeled": self.unlabeled, "demoted": self.demoted, "target_from": self.target_from,
                "tiers": self.tiers}


def ensure_tiered_splits(preprocessed_base: str, identifiers: Sequence[str], spec: DatasetSpec) -> Optional[str]:
    """Write ``splits_final.json`` (folds over expert cases) if the dataset has non-expert labeled cases and no
    split file exists. Returns the path written, or None."""
    from nnx.io_utils import atomic_write_json
    path = os.path.join(preprocessed_base, "splits_final.json")
    if os.path.isfile(path) or not spec.has_block:
        return None
    if all(spec.tier(c) == "expert" for c in identifiers):
        return None  # nnU-Net's own split is the same
    atomic_write_json(tiered_splits(identifiers, spec.tiers), path)
    return path


def resolve_fold(spec: DatasetSpec, train_keys: Sequence[str], val_keys: Sequence[str], fold,
                 labeled: str = "", demote_to: str = "none", train_tiers: Sequence[str] = LABELED_TIERS,
                 stock: bool = False) -> FoldData:
    """Effective tiers and case sets of a fold. ``stock=True``: a stock trainer, which can only use labelsTr, so
    demoted cases are simply left out."""
    seed = SEED + (fold if isinstance(fold, int) else 0)
    eff, demoted = apply_label_ratio(list(train_keys), spec.tiers, labeled, demote_to, seed)
    if stock:
        train = stock_train_keys(eff, demoted)
        if not train:
            raise NNXError(f"labeled={labeled} leaves a stock trainer no labeled training case (it reads only "
                           f"labelsTr); nnxTierTrainer with demote_to=coarse or scribble trains stock nnU-Net on the "
                           f"non-expert labels")
        return FoldData(spec, eff, demoted, train, list(val_keys), labeled_setting=labeled, demote_to=demote_to)
    target_from = {c: TARGET_ENTRY[eff[c]] for c in demoted if eff[c] in TARGET_ENTRY}
    for c, entry in target_from.items():
        if entry not in spec.entries:
            raise NNXError(f"demote_to={demote_to} needs the dataset's '{entry}' files (nnx.{entry} in dataset.json),"
                           f" which it does not declare")
    train = sorted(c for c in train_keys if eff[c] in train_tiers)
    if not train:
        raise NNXError(f"no labeled training case left in fold {fold} (labeled={labeled or 'all'}, "
                       f"demote_to={demote_to}, tiers the trainer trains on: {', '.join(train_tiers)})")
    unl = sorted([c for c in demoted if eff[c] == "none"] + spec.unlabeled_cases)
    for c in spec.unlabeled_cases:
        eff[c] = "none"
    return FoldData(spec, eff, demoted, train, list(val_keys), unl, target_from, labeled, demote_to)


def check_extras(preprocessed_folder: str, plans: dict, configuration: str, needed: Sequence[str],
                 cases: Sequence[str], unlabeled_cases: Sequence[str]) -> str:
    """The ``__nnx`` folder for ``preprocessed_folder`` exists, matches the plans and has ``needed`` entries for
    ``cases`` (and ``unlabeled`` for tier-none cases). Returns its path."""
    root = extras_folder(preprocessed_folder)
    m = load_manifest(root)
    if m is None:
        raise NNXError("annotation tiers / auxiliary inputs are not preprocessed for this configuration; run "
                       "nnx_plan for the dataset first", root)
    sig = plans_signature(plans, configuration)
    if m.get("signature") != sig:
        raise NNXError("preprocessed tiers / auxiliary inputs are stale (plans changed since); run nnx_plan again",
                       root)
    for name in needed:
        have = set((m.get("entries", {}).get(name) or {}).get("cases", []))
        missing = [c for c in cases if c not in have]
        if missing:
            raise NNXError(f"no '{name}' input for case(s) {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} (declared in dataset.json nnx block?)", root)
    have_unl = set((m.get("unlabeled") or {}).get("cases", []))
    missing = [c for c in unlabeled_cases if c not in have_unl]
    if missing:
        raise NNXError(f"unlabeled case(s) {', '.join(missing[:5])} are not preprocessed; run nnx_plan again",
                       os.path.join(root, UNLABELED))
    return root
