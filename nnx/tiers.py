"""The ``nnx`` block of dataset.json: annotation tiers and auxiliary inputs (contract: docs/dataset_format.md).

:class:`DatasetSpec` turns the block into named *entries*, the unit that preprocessing, loading and prediction
work with:

=============  =======  =============================================================  ==========================
entry          kind     raw folders                                                    inference input?
=============  =======  =============================================================  ==========================
``coarse``     label    ``coarse.train`` / ``coarse.test``, task labels                yes (test folder)
``scribbles``  label    ``scribbles.train``, task labels + ignore value                no
``<map>``      label    ``aux_maps.<map>.train`` / ``.test``, the map's own labels     yes (test folder)
``train_only`` image    ``train_only_channels.folder`` (``CASE_XXXX``), channel_names  no (absent at inference)
=============  =======  =============================================================  ==========================

Unlabeled cases (tier ``none``) are not an entry: they are a case set of their own.
This module only parses and resolves names/paths; :mod:`nnx.checks` validates files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

from nnx.errors import NNXError

TIERS = ("expert", "coarse", "scribble", "none")
LABELED_TIERS = ("expert", "coarse", "scribble")
RESERVED_ENTRY_NAMES = ("coarse", "scribbles", "train_only", "unlabeled", "data", "target", "keys", "tiers")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One auxiliary input of a dataset (see the module table)."""
    name: str
    kind: str                       # "label" (label map, label-safe resampling) or "image" (channels, normalised)
    train_folder: Optional[str]     # folder name inside the raw dataset
    test_folder: Optional[str]
    labels: Dict[str, int] = field(default_factory=dict)        # kind "label": name -> value (background 0)
    channel_names: Dict[str, str] = field(default_factory=dict)  # kind "image": "0" -> name (normalisation)
    ignore_value: Optional[int] = None                          # scribbles only

    @property
    def is_label(self) -> bool:
        return self.kind == "label"

    @property
    def num_channels(self) -> int:
        return len(self.channel_names) if self.kind == "image" else 1

    @property
    def foreground_values(self) -> List[int]:
        """Label values that become one-hot channels when the entry is a network input (sorted, no background,
        no ignore)."""
        vals = sorted({int(v) for k, v in self.labels.items() if k != "ignore" and int(v) != 0})
        return vals

    def train_files(self, raw_folder: str, case: str, file_ending: str) -> List[str]:
        return self._files(raw_folder, self.train_folder, case, file_ending)

    def test_files(self, folder: str, case: str, file_ending: str) -> List[str]:
        """Files of ``case`` inside ``folder`` (an inference input folder chosen by the user)."""
        if self.kind == "image":
            return [os.path.join(folder, f"{case}_{int(c):04d}{file_ending}") for c in sorted(self.channel_names, key=int)]
        return [os.path.join(folder, case + file_ending)]

    def _files(self, raw_folder: str, sub: Optional[str], case: str, file_ending: str) -> List[str]:
        if sub is None:
            return []
        return self.test_files(os.path.join(raw_folder, sub), case, file_ending)


@dataclass
class DatasetSpec:
    """Parsed ``nnx`` block (or the trivial spec of a plain nnU-Net dataset: every imagesTr case is expert)."""
    tiers: Dict[str, str]
    entries: Dict[str, Entry]
    unlabeled_folder: Optional[str]
    task_labels: Dict[str, int]
    file_ending: str
    has_block: bool

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_dataset_json(cls, dj: Mapping, json_path: str = "dataset.json") -> "DatasetSpec":
        labels = {k: int(v) for k, v in dj.get("labels", {}).items() if not isinstance(v, (list, tuple))}
        fe = dj.get("file_ending", ".nii.gz")
        block = dj.get("nnx")
        if block is None:
            return cls({}, {}, None, labels, fe, False)
        if not isinstance(block, Mapping):
            raise NNXError("'nnx' must be an object (see docs/dataset_format.md)", json_path)
        ver = block.get("format_version")
        if ver != FORMAT_VERSION:
            raise NNXError(f"nnx.format_version must be {FORMAT_VERSION}, got {ver!r}", json_path)
        tiers = block.get("tiers")
        if not isinstance(tiers, Mapping) or not tiers:
            raise NNXError("nnx.tiers must map every training case to expert|coarse|scribble|none", json_path)
        for case, t in tiers.items():
            if t not in TIERS:
                raise NNXError(f"nnx.tiers[{case!r}] = {t!r} is not one of {'|'.join(TIERS)}", json_path)
        entries: Dict[str, Entry] = {}
        co = block.get("coarse")
        if co is not None:
            _need_folders(co, "nnx.coarse", ("train", "test"), json_path)
            entries["coarse"] = Entry("coarse", "label", co.get("train"), co.get("test"),
                                      labels={k: v for k, v in labels.items() if k != "ignore"})
        sc = block.get("scribbles")
        if sc is not None:
            _need_folders(sc, "nnx.scribbles", ("train",), json_path)
            iv = sc.get("ignore_value", labels.get("ignore"))
            if not isinstance(iv, int) or isinstance(iv, bool):
                raise NNXError("nnx.scribbles.ignore_value must be an integer (the 'ignore' label)", json_path)
            entries["scribbles"] = Entry("scribbles", "label", sc.get("train"), None,
                                         labels={**{k: v for k, v in labels.items() if k != "ignore"},
                                                 "ignore": iv}, ignore_value=iv)
        for name, m in (block.get("aux_maps") or {}).items():
            if name in RESERVED_ENTRY_NAMES or not name.isidentifier():
                raise NNXError(f"nnx.aux_maps name {name!r} is reserved or not an identifier", json_path)
            if not isinstance(m, Mapping):
                raise NNXError(f"nnx.aux_maps.{name} must be an object", json_path)
            _need_folders(m, f"nnx.aux_maps.{name}", ("train", "test"), json_path)
            ml = m.get("labels")
            if not isinstance(ml, Mapping) or ml.get("background") != 0 or \
                    not all(isinstance(v, int) and not isinstance(v, bool) for v in ml.values()):
                raise NNXError(f"nnx.aux_maps.{name}.labels must map names to integers with background 0",
                               json_path)
            entries[name] = Entry(name, "label", m.get("train"), m.get("test"), labels=dict(ml))
        to = block.get("train_only_channels")
        if to is not None:
            if not isinstance(to, Mapping) or not isinstance(to.get("folder"), str) or \
                    not isinstance(to.get("channel_names"), Mapping) or not to["channel_names"]:
                raise NNXError("nnx.train_only_channels needs 'folder' and a non-empty 'channel_names'", json_path)
            keys = sorted(to["channel_names"], key=lambda k: int(k) if str(k).isdigit() else -1)
            if keys != [str(i) for i in range(len(keys))]:
                raise NNXError("nnx.train_only_channels.channel_names keys must be \"0\", \"1\", ...", json_path)
            entries["train_only"] = Entry("train_only", "image", to["folder"], None,
                                          channel_names={k: str(v) for k, v in to["channel_names"].items()})
        un = block.get("unlabeled")
        unl = None
        if un is not None:
            _need_folders(un, "nnx.unlabeled", ("train",), json_path)
            unl = un.get("train")
        if unl is None and any(t == "none" for t in tiers.values()):
            unl = "imagesUnlabeledTr"
        return cls(dict(tiers), entries, unl, labels, fe, True)

    @classmethod
    def from_folder(cls, folder: str) -> "DatasetSpec":
        import json
        p = os.path.join(folder, "dataset.json")
        with open(p) as f:
            return cls.from_dataset_json(json.load(f), p)

    # -- queries -------------------------------------------------------------------------------------------------
    def tier(self, case: str) -> str:
        return self.tiers.get(case, "expert")

    @property
    def unlabeled_cases(self) -> List[str]:
        return sorted(c for c, t in self.tiers.items() if t == "none")

    def cases_of(self, tier: str) -> List[str]:
        return sorted(c for c, t in self.tiers.items() if t == tier)

    def entry(self, name: str) -> Entry:
        if name not in self.entries:
            have = ", ".join(self.entries) or "none"
            raise NNXError(f"the dataset declares no '{name}' input (nnx block of dataset.json has: {have})")
        return self.entries[name]



def _need_folders(obj, where: str, keys: Tuple[str, ...], json_path: str) -> None:
    if not isinstance(obj, Mapping):
        raise NNXError(f"{where} must be an object", json_path)
    for k in keys:
        v = obj.get(k)
        if v is not None and (not isinstance(v, str) or not v or "/" in v or "\\" in v):
            raise NNXError(f"{where}.{k} must be a folder name inside the dataset folder, got {v!r}", json_path)

