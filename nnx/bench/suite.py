"""Benchmark suites: what ``nnx_bench`` compares, read from a YAML/JSON file, a Python dict or a built-in name.

A suite names the dataset, the label setting, the trainers ("arms") and how long each trains::

    name: my_comparison
    dataset:
      id: 4                           # an nnU-Net dataset in nnUNet_raw ...
      # phantom: small                # ... or an nnx_synth phantom preset, written into the bench folder
      # phantom_id: 870               #     its dataset id (default 870)
      # phantom_seed: 0
      # phantom_options: {tiers: "expert=0.5,coarse=0.5", num_train: 16}   # nnx_synth options
    configuration: 3d_fullres
    plans: {identifier: nnUNetPlans, gpu_memory_target: null, trainer: null}   # planned once, for every arm
    fold: 0
    labels: {labeled: "10%", demote_to: coarse}     # label setting: options given to every arm
    training: {epochs: 50, iters_per_epoch: 100, val_iters: 10}
    seeds: 3
    test:                              # folders relative to the raw dataset folder (or absolute)
      images: imagesTs
      labels: labelsTs
      inputs: {coarse: coarseTs}       # inference inputs of models trained with them (nnx_predict -inputs)
      tta: true                        # test-time mirroring
      # source: validation             # instead: fold validation predictions vs the preprocessed ground truth
    references: {coarse masks: coarseTs}   # folders evaluated as if they were predictions (no training)
    arms:                              # or: trainers: [nnUNetTrainer, RotNPCTrainer]
      - {name: stock, trainer: nnUNetTrainer}
      - {name: mine, trainer: MyTrainer, options: {K: 3}, measure_options: {warmup_epochs: 0}}
      # an arm on its own dataset (same keys as 'dataset', planned with the same 'plans' settings) is trained
      # only (no test, no evaluation, no speed measurement): a model another arm builds on; an option value
      # "@arm:NAME" is replaced by arm NAME's results folder (<Trainer>__<Plans>__<configuration>) of the same seed
      # (NAME must come earlier in the list)
      # - {name: Organs, trainer: nnUNetTrainer, dataset: {phantom: small, phantom_id: 875,
      #                                                    phantom_options: {task: organs}}}
      # - {name: GRASP, trainer: GRASPTrainer, options: {anatomy_model: "@arm:Organs"}}
      # prediction-time options (nnx_predict --opt; the trainer's nnx_inference_options): an arm whose trainer and
      # options equal an earlier arm's shares that arm's training and is only predicted differently
      # - {name: GRASP fused-inf, trainer: GRASPTrainer, options: {anatomy_model: "@arm:Organs"},
      #    predict_options: {inference_fusion: "on"}}
    baseline: stock                    # deltas are taken against this arm (default: the first)
    measure: {steps: 3, rounds: 3, warmup: 2, infer: 3, mode: interleaved, group: 0}
    # group: N > 1 keeps at most N worker processes alive at once (the stock arm runs in every group)

``measure_options`` are merged into an arm's options for the speed and memory measurement only (e.g. to time the
steady state of a trainer whose schedule switches a module on later). ``mode: overhead`` suites only measure
(speed and memory of a few training steps; no training, no test set).
Every arm's options are validated against its trainer before anything runs. Every suite needs an arm with the
stock ``nnUNetTrainer``: speed and memory are reported as ratios to it.

Built-in suites: ``overhead`` (every registered trainer) and whatever plugins register in the entry-point group
``nnx.bench_suites`` (``name = "module:OBJECT"``, a dict like the above or a function returning one).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Dict, List, Mapping, Optional, Tuple

from nnx.errors import NNXError

ENTRY_POINT_GROUP = "nnx.bench_suites"
STOCK = "nnUNetTrainer"
STOCK_PLANS = "nnUNetPlans"
DEFAULT_PHANTOM_ID = 870
MODES = ("full", "overhead")
MEASURE_MODES = ("interleaved", "sequential")
_TOP_KEYS = {"name", "description", "mode", "dataset", "configuration", "plans", "fold", "labels", "training",
             "seeds", "test", "references", "arms", "trainers", "baseline", "measure", "device"}
_DATASET_KEYS = {"id", "phantom", "phantom_id", "phantom_seed", "phantom_options"}
_PLANS_KEYS = {"identifier", "gpu_memory_target", "trainer", "planner"}
_TEST_KEYS = {"source", "images", "labels", "inputs", "tta", "step_size"}
_MEASURE_KEYS = {"steps", "rounds", "warmup", "infer", "mode", "group"}
_ARM_KEYS = {"name", "trainer", "options", "dataset", "measure_options", "predict_options"}
ARM_REF = "@arm:"
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*( [A-Za-z0-9_.+()-]+)*$")


def arm_reference(value: Any) -> Optional[str]:
    """``"@arm:NAME"`` -> ``NAME`` (an option value standing for arm NAME's results folder), else None."""
    return value[len(ARM_REF):] if isinstance(value, str) and value.startswith(ARM_REF) else None


@dataclass
class Arm:
    name: str
    trainer: str
    options: Dict[str, str]  # raw key=value strings (nnx_train --opt), label setting and schedule merged in
    dataset: Optional[Dict[str, Any]] = None  # its own dataset: trained only (a model other arms refer to)
    measure_options: Dict[str, str] = field(default_factory=dict)
    predict_options: Dict[str, str] = field(default_factory=dict)  # nnx_predict --opt (inference options only)

    @property
    def evaluated(self) -> bool:
        return self.dataset is None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.name)


@dataclass
class Suite:
    name: str
    description: str
    mode: str
    dataset: Dict[str, Any]
    configuration: str
    plans: Dict[str, Any]
    fold: int
    seeds: int
    test: Dict[str, Any]
    references: Dict[str, str]
    arms: List[Arm]
    baseline: str
    measure: Dict[str, Any]
    device: Optional[str] = None
    source: str = ""
    raw: Dict[str, Any] = field(default_factory=dict)

    @property
    def stock_arm(self) -> Arm:
        return next(a for a in self.arms if a.trainer == STOCK and a.evaluated)

    @property
    def evaluated_arms(self) -> List[Arm]:
        return [a for a in self.arms if a.evaluated]

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "description": self.description, "mode": self.mode, "dataset": self.dataset,
                "configuration": self.configuration, "plans": self.plans, "fold": self.fold, "seeds": self.seeds,
                "test": self.test, "references": self.references, "baseline": self.baseline,
                "arms": [{"name": a.name, "trainer": a.trainer, "options": a.options,
                          **({"dataset": a.dataset} if a.dataset is not None else {}),
                          **({"measure_options": a.measure_options} if a.measure_options else {}),
                          **({"predict_options": a.predict_options} if a.predict_options else {})}
                         for a in self.arms],
                "measure": self.measure, "source": self.source}

    def training_arm(self, arm: Arm) -> Arm:
        """The first arm with the same training as ``arm`` (same dataset, trainer and options; arms that differ
        only in ``predict_options`` share one training)."""
        key = self.run_key(arm, 0)
        return next(a for a in self.arms if a.dataset == arm.dataset and self.run_key(a, 0) == key)

    def predict_key(self, arm: Arm, seed: int) -> str:
        """Identity of an arm's test predictions: its training, the test settings, its prediction options."""
        return digest({"run": self.run_key(arm, seed), "test": self.test,
                       **({"predict_options": arm.predict_options} if arm.predict_options else {})})

    def data_key(self, arm: Optional[Arm] = None) -> str:
        """Identity of the planned data (of an arm with its own dataset): a change re-plans (and re-runs)."""
        ds = arm.dataset if arm is not None and arm.dataset is not None else self.dataset
        return digest({"dataset": ds, "configuration": self.configuration, "plans": self.plans})

    def run_key(self, arm: Arm, seed: int) -> str:
        options = {k: v for k, v in arm.options.items() if k != "save_every"}  # checkpoint cadence: same result
        # an "@arm:NAME" value stands for that arm's run: a change there re-runs this arm too
        options = {k: (f"{v}#{self.run_key(self.arm(arm_reference(v)), seed)}" if arm_reference(v) else v)
                   for k, v in options.items()}
        return digest({"data": self.data_key(arm), "fold": self.fold, "trainer": arm.trainer, "options": options,
                       "seed": seed})


def digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------------
# built-in suites


def overhead_suite() -> Dict[str, Any]:
    """Every registered trainer against the stock trainer on one tiny phantom that has every annotation tier,
    anatomy maps, a train-only channel and unlabeled cases (so that every trainer finds what it requires)."""
    from nnx.registry import load_trainer, trainer_names
    return {
        "name": "overhead",
        "description": "a few training steps of every registered trainer vs the stock trainer, same plans",
        "mode": "overhead",
        "dataset": {"phantom": "tiny", "phantom_id": 871, "phantom_seed": 0,
                    "phantom_options": {"tiers": "expert=0.5,coarse=0.2,scribble=0.2,none=0.1", "pet": "train_only",
                                        "num_train": 10, "num_test": 1}},
        "configuration": "3d_fullres",
        # a trainer that cannot run on defaults alone (e.g. one that needs a trained model as an option) declares
        # the options for this suite in its class attribute nnx_overhead_options
        "arms": [{"trainer": n, "options": dict(getattr(load_trainer(n), "nnx_overhead_options", None) or {})}
                 for n in trainer_names()],
        # groups of 4 processes (the stock trainer in each): about 1.3 GB of RSS per worker on CPU, so every
        # registered trainer at once would not fit a small machine
        "measure": {"steps": 2, "rounds": 3, "warmup": 1, "infer": 2, "group": 4},
    }


def builtin_suites() -> Dict[str, Any]:
    """name -> loader (a callable returning the suite dict)."""
    out: Dict[str, Any] = {"overhead": overhead_suite}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.setdefault(ep.name, ep)
    return out


def _load_builtin(name: str, target: Any) -> Dict[str, Any]:
    if callable(target) and not hasattr(target, "load"):
        return target()
    try:
        obj = target.load()
    except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the others
        raise NNXError(f"built-in suite '{name}' ({target.value}) cannot be loaded: {type(e).__name__}: {e}") \
            from None
    return obj() if callable(obj) else copy.deepcopy(obj)


def read_suite_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise NNXError("suite file not found", path)
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise NNXError(f"not valid YAML{where}: {getattr(e, 'problem', e)}", path) from None
    else:
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise NNXError(f"not valid JSON: {e}", path) from None
    if not isinstance(obj, dict):
        raise NNXError("a suite must be a mapping (name, dataset, arms, ...)", path)
    obj.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return obj


def raw_suite(spec: str) -> Tuple[Dict[str, Any], str]:
    """A built-in name or a .yaml/.yml/.json path -> (the suite as a dict, where it came from)."""
    builtins = builtin_suites()
    if spec in builtins:
        return _load_builtin(spec, builtins[spec]), f"built-in suite '{spec}'"
    if os.path.exists(spec) or spec.endswith((".json", ".yaml", ".yml")):
        return read_suite_file(spec), spec
    raise NNXError(f"unknown suite '{spec}': not a file and not a built-in suite "
                   f"(built-in: {', '.join(sorted(builtins))})")


def load_suite(spec: Any) -> Suite:
    """A built-in name, a .yaml/.yml/.json path, or a dict -> validated :class:`Suite`."""
    if isinstance(spec, Mapping):
        return parse_suite(dict(spec), "suite")
    return parse_suite(*raw_suite(spec))


def _mapping(obj: Any, key: str, where: str, allowed: Optional[set] = None) -> Dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise NNXError(f"'{key}' must be a mapping", where)
    if allowed is not None:
        unknown = sorted(set(obj) - allowed)
        if unknown:
            raise NNXError(f"unknown key(s) in '{key}': {', '.join(unknown)} (known: {', '.join(sorted(allowed))})",
                           where)
    return dict(obj)


def _int(value: Any, key: str, where: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise NNXError(f"'{key}' must be an integer >= {lo}, got {value!r}", where)
    return value


def _opt_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_dataset(obj: Any, key: str, where: str) -> Dict[str, Any]:
    dataset = _mapping(obj, key, where, _DATASET_KEYS)
    if ("id" in dataset) == ("phantom" in dataset):
        raise NNXError(f"'{key}' needs exactly one of 'id' (an nnU-Net dataset) or 'phantom' (an nnx_synth "
                       "preset)", where)
    if "phantom" in dataset:
        from nnx.synth.dataset import PRESETS
        if dataset["phantom"] not in PRESETS:
            raise NNXError(f"unknown phantom preset {dataset['phantom']!r} (presets: {', '.join(PRESETS)})", where)
        dataset.setdefault("phantom_id", DEFAULT_PHANTOM_ID)
        dataset.setdefault("phantom_seed", 0)
        dataset["phantom_options"] = _mapping(dataset.get("phantom_options"), f"{key}.phantom_options", where)
        _int(dataset["phantom_id"], f"{key}.phantom_id", where, 1)
    elif any(k.startswith("phantom_") for k in dataset):
        raise NNXError(f"'phantom_*' keys need '{key}.phantom'", where)
    return dataset


def parse_suite(obj: Dict[str, Any], where: str) -> Suite:
    unknown = sorted(set(obj) - _TOP_KEYS)
    if unknown:
        raise NNXError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS))})", where)
    name = str(obj.get("name") or "suite")
    mode = obj.get("mode", "full")
    if mode not in MODES:
        raise NNXError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}", where)

    dataset = _parse_dataset(obj.get("dataset"), "dataset", where)

    configuration = str(obj.get("configuration", "3d_fullres"))
    plans = _mapping(obj.get("plans"), "plans", where, _PLANS_KEYS)
    # an existing dataset: its nnUNetPlans are used as they are if preprocessed; a phantom is planned here
    plans.setdefault("identifier", STOCK_PLANS if "id" in dataset else None)
    fold = _int(obj.get("fold", 0), "fold", where, 0)
    seeds = _int(obj.get("seeds", 1), "seeds", where, 1)
    labels = {k: _opt_str(v) for k, v in _mapping(obj.get("labels"), "labels", where,
                                                  {"labeled", "demote_to"}).items()}
    training = {k: _opt_str(v) for k, v in _mapping(obj.get("training"), "training", where,
                                                    {"epochs", "iters_per_epoch", "val_iters", "initial_lr",
                                                     "save_every"}).items()}
    test = _mapping(obj.get("test"), "test", where, _TEST_KEYS)
    source = test.get("source", "test")
    if source not in ("test", "validation"):
        raise NNXError(f"'test.source' must be 'test' or 'validation', got {source!r}", where)
    test["source"] = source
    if source == "test":
        test.setdefault("images", "imagesTs")
        test.setdefault("labels", "labelsTs")
    test["inputs"] = {str(k): str(v) for k, v in _mapping(test.get("inputs"), "test.inputs", where).items()}
    test.setdefault("tta", True)
    test.setdefault("step_size", 0.5)
    references = {str(k): str(v) for k, v in _mapping(obj.get("references"), "references", where).items()}
    if references and source != "test":
        raise NNXError("'references' need a test set (test.source: test)", where)

    measure = _mapping(obj.get("measure"), "measure", where, _MEASURE_KEYS)
    measure = {"steps": 3, "rounds": 3, "warmup": 2, "infer": 3, "mode": "interleaved", "group": 0, **measure}
    for k, lo in (("steps", 1), ("rounds", 1), ("warmup", 1), ("infer", 0), ("group", 0)):
        measure[k] = _int(measure[k], f"measure.{k}", where, lo)
    if measure["mode"] not in MEASURE_MODES:
        raise NNXError(f"'measure.mode' must be one of {', '.join(MEASURE_MODES)}", where)

    arms = _parse_arms(obj, where, {**training, **labels})
    for a in arms:
        if a.dataset is not None and a.dataset == dataset:
            raise NNXError(f"arm '{a.name}': its 'dataset' is the suite's (leave it out)", where)
        if a.dataset is not None and "phantom" in a.dataset and "phantom" in dataset and \
                a.dataset["phantom_id"] == dataset["phantom_id"]:
            raise NNXError(f"arm '{a.name}': its phantom needs a phantom_id other than the suite's "
                           f"({dataset['phantom_id']})", where)
    baseline = str(obj.get("baseline") or next(a.name for a in arms if a.evaluated))
    if baseline not in [a.name for a in arms if a.evaluated]:
        raise NNXError(f"'baseline' {baseline!r} is not an arm (arms: {', '.join(a.name for a in arms)})", where)
    if mode == "full" and not training.get("epochs"):
        raise NNXError("'training.epochs' is required (nnU-Net's default of 1000 epochs is not a benchmark "
                       "setting you want by accident)", where)
    device = obj.get("device")
    if device is not None and device not in ("cpu", "cuda"):
        raise NNXError(f"'device' must be cpu or cuda, got {device!r}", where)
    return Suite(name=name, description=str(obj.get("description", "")), mode=mode, dataset=dataset,
                 configuration=configuration, plans=plans, fold=fold, seeds=seeds, test=test, references=references,
                 arms=arms, baseline=baseline, measure=measure, device=device,
                 source=where, raw=copy.deepcopy(obj))


def _parse_arms(obj: Dict[str, Any], where: str, common: Dict[str, str]) -> List[Arm]:
    from nnx import options as nnx_options
    from nnx.registry import load_trainer
    if ("arms" in obj) == ("trainers" in obj):
        raise NNXError("give exactly one of 'arms' (name, trainer, options) or 'trainers' (a list of names)", where)
    items = obj.get("arms") if "arms" in obj else [{"trainer": t} for t in (obj.get("trainers") or [])]
    if not isinstance(items, list) or not items:
        raise NNXError("'arms'/'trainers' must be a non-empty list", where)
    arms: List[Arm] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"trainer": item}
        item = _mapping(item, f"arms[{i}]", where, _ARM_KEYS)
        if "trainer" not in item:
            raise NNXError(f"arms[{i}] has no 'trainer'", where)
        trainer = str(item["trainer"])
        name = str(item.get("name") or trainer)
        if not _ARM_NAME.match(name):
            raise NNXError(f"arm name {name!r}: use letters, digits, '_.+-()' and single spaces", where)
        if name in [a.name for a in arms]:
            raise NNXError(f"two arms are named {name!r} (give them distinct 'name's)", where)
        raw = dict(common)
        raw.update({str(k): _opt_str(v) for k, v in _mapping(item.get("options"), f"arms[{i}].options",
                                                              where).items()})
        measure_opts = {str(k): _opt_str(v) for k, v in _mapping(item.get("measure_options"),
                                                                 f"arms[{i}].measure_options", where).items()}
        for k, v in list(raw.items()) + list(measure_opts.items()):
            ref = arm_reference(v)
            if ref is not None and ref not in [a.name for a in arms]:
                raise NNXError(f"arm '{name}': option {k}={v} must name an earlier arm (arms so far: "
                               f"{', '.join(a.name for a in arms) or 'none'})", where)
        try:
            nnx_options.resolve(load_trainer(trainer), raw, f"arm '{name}'")
            nnx_options.resolve(load_trainer(trainer), {**raw, **measure_opts}, f"arm '{name}' (measure_options)")
        except NNXError as e:
            raise NNXError(str(e), where) from None
        predict_opts = {str(k): _opt_str(v) for k, v in _mapping(item.get("predict_options"),
                                                                 f"arms[{i}].predict_options", where).items()}
        if predict_opts:
            from nnx.inference_inputs import inference_option_overrides
            try:
                inference_option_overrides(trainer, predict_opts)
            except NNXError as e:
                raise NNXError(f"arm '{name}': {e.message}", where) from None
        arm_ds = _parse_dataset(item["dataset"], f"arms[{i}].dataset", where) if "dataset" in item else None
        if arm_ds is not None and (measure_opts or predict_opts):
            raise NNXError(f"arm '{name}' has its own dataset: it is trained only, 'measure_options' and "
                           f"'predict_options' do not apply", where)
        arms.append(Arm(name=name, trainer=trainer, options=raw, dataset=arm_ds, measure_options=measure_opts,
                        predict_options=predict_opts))
    if not any(a.evaluated for a in arms):
        raise NNXError("every arm has its own 'dataset': at least one arm must train on the suite's dataset", where)
    if not any(a.trainer == STOCK and a.evaluated for a in arms):
        raise NNXError(f"no arm runs the stock {STOCK}: speed and memory are reported as ratios to it, and every "
                       f"method is compared with it (add '- {STOCK}')", where)
    return arms
