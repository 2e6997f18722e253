"""The stages of a benchmark run, each resumable: dataset -> plans -> train -> predict -> evaluate -> measure.

Layout of the output folder::

    suite.json                      the resolved suite (what ran)
    workspace/raw, preprocessed     phantom suites only: the phantom and its preprocessed data
    plan.json                       the plans identifier used (and the key of the data it belongs to)
    plan_<arm>.json                 the same for an arm with its own dataset (trained only, see nnx.bench.suite)
    runs/<arm>/seed<k>/results/     nnUNet_results of that training run (nnU-Net's usual layout)
    runs/<arm>/seed<k>/train.json   finished training (key, wall time); train.log: its output
    runs/<arm>/seed<k>/pred/        test predictions; predict.json: seconds per case
    runs/<arm>/seed<k>/eval.json    Dice / CC-Dice (summary.json: nnx_evaluate's full summary)
    references/<name>/eval.json     folders evaluated as predictions
    measure/measure.json            speed and memory (interleaved steps); measure/<arm>.log
    results.json, results.md, accuracy.png, overhead.png

A stage is done when its JSON file exists and carries the key of its inputs (dataset, plans, trainer, options,
seed): a killed bench continues where it stopped, and a changed arm re-runs only that arm. A killed training
continues from its ``checkpoint_latest.pth`` (nnU-Net's ``--c``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

from nnx.bench.suite import STOCK_PLANS, Arm, Suite, arm_reference, digest
from nnx.errors import NNXError
from nnx.io_utils import atomic_write_json

_EPOCH = re.compile(r"Epoch (\d+)\s*$")


def _load(path: str) -> Optional[Dict[str, Any]]:
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def done(path: str, key: str) -> Optional[Dict[str, Any]]:
    rec = _load(path)
    return rec if rec is not None and rec.get("key") == key else None


class Bench:
    def __init__(self, suite: Suite, out: str, device: str, progress: Callable[[str], None] = print):
        self.suite = suite
        self.out = os.path.abspath(out)
        self.device = device
        self.say = progress
        self.dataset: Optional[str] = None
        self.plans: Optional[str] = None
        self.arm_data: Dict[str, Tuple[str, str]] = {}  # arm with its own dataset -> (dataset, plans)

    # -- dataset and plans -----------------------------------------------------------------------------------------
    def run_dir(self, arm: Arm, seed: int) -> str:
        return os.path.join(self.out, "runs", arm.slug, f"seed{seed}")

    def raw_folder(self) -> str:
        return os.path.join(os.environ["nnUNet_raw"], self.dataset)

    def prepare_dataset(self) -> str:
        self.dataset = self._dataset(self.suite.dataset, os.path.join(self.out, "workspace", "phantom.json"))
        return self.dataset

    def _dataset(self, ds: Dict[str, Any], stamp: str) -> str:
        if "phantom" in ds:
            from nnx.synth import make_dataset
            key = digest(ds)
            rec = done(stamp, key)
            if rec and os.path.isdir(os.path.join(os.environ["nnUNet_raw"], rec["dataset"])):
                self.say(f"phantom {rec['dataset']}: done")
                return rec["dataset"]
            t0 = time.time()
            rep = make_dataset(int(ds["phantom_id"]), preset=ds["phantom"], seed=int(ds["phantom_seed"]),
                               overwrite=True, **ds["phantom_options"])
            dataset = os.path.basename(rep.folder)
            shutil.rmtree(os.path.join(os.environ["nnUNet_preprocessed"], dataset), ignore_errors=True)
            atomic_write_json({"key": key, "dataset": dataset}, stamp)
            self.say(f"phantom {dataset} written ({time.time() - t0:.0f} s)")
            return dataset
        from nnx import checks
        return checks.resolve_dataset(str(ds["id"]), where=("raw", "preprocessed"))

    def prepare_plans(self) -> str:
        self.plans = self._plans(self.dataset, self.suite.dataset, self.suite.data_key(), "plan")
        return self.plans

    def prepare_arm_datasets(self) -> None:
        """Arms with their own ``dataset`` (e.g. an organ model that another arm uses): written and planned like the
        suite's dataset (same ``plans`` settings), stamped in ``workspace/phantom_<slug>.json`` and
        ``plan_<slug>.json``."""
        for arm in self.suite.arms:
            if arm.dataset is None:
                continue
            ds = self._dataset(arm.dataset, os.path.join(self.out, "workspace", f"phantom_{arm.slug}.json"))
            self.arm_data[arm.name] = (ds, self._plans(ds, arm.dataset, self.suite.data_key(arm), f"plan_{arm.slug}"))

    def _plans(self, dataset: str, ds_spec: Dict[str, Any], key: str, stem: str) -> str:
        from nnx.cli.common import default_processes
        from nnx.cli.plan import nnx_planning, plan_dataset
        p = self.suite.plans
        stamp = os.path.join(self.out, stem + ".json")
        rec = done(stamp, key)
        pp = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
        if rec and os.path.isfile(os.path.join(pp, rec["plans"] + ".json")):
            self.say(f"plans {rec['plans']} of {dataset}: done")
            return rec["plans"]
        ident = p.get("identifier")
        if "id" in ds_spec and ident and os.path.isfile(os.path.join(pp, ident + ".json")) \
                and self._preprocessed(pp, ident):
            plans = ident
            self.say(f"plans {ident}: using the existing plans and preprocessed data of {dataset}")
        else:
            import contextlib
            if ident == STOCK_PLANS and nnx_planning(p.get("trainer"), p.get("gpu_memory_target"), self.device):
                ident = None  # nnx plans (CPU, a trainer, a budget) get nnx's own name, never nnU-Net's plans file
            t0 = time.time()
            log = os.path.join(self.out, stem + ".log")
            self.say(f"planning and preprocessing {dataset} (output in {log})")
            with open(log, "w") as f, contextlib.redirect_stdout(f):
                plans = plan_dataset(dataset, [self.suite.configuration], p.get("planner") or "default",
                                     p.get("gpu_memory_target"), plans_name=ident,
                                     num_processes=default_processes(), trainer=p.get("trainer"),
                                     device=self.device)
            self.say(f"planned and preprocessed {dataset} ({plans}, {time.time() - t0:.0f} s)")
        atomic_write_json({"key": key, "plans": plans, "dataset": dataset}, stamp)
        return plans

    def _preprocessed(self, pp: str, ident: str) -> bool:
        from nnx.io_utils import read_json
        plans = read_json(os.path.join(pp, ident + ".json"), "plans file")
        cfg = plans.get("configurations", {}).get(self.suite.configuration)
        if cfg is None:
            raise NNXError(f"configuration '{self.suite.configuration}' not in plans {ident}",
                           os.path.join(pp, ident + ".json"))
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        folder = os.path.join(pp, PlansManager(plans).get_configuration(self.suite.configuration).data_identifier)
        return os.path.isdir(folder) and any(f.endswith(".pkl") for f in os.listdir(folder))

    # -- training --------------------------------------------------------------------------------------------------
    def data_of(self, arm: Arm) -> Tuple[str, str]:
        """(dataset, plans) the arm trains on."""
        return self.arm_data.get(arm.name, (self.dataset, self.plans))

    def model_dir(self, arm: Arm, seed: int) -> str:
        """The trained model of ``arm`` (in the run folder of the arm whose training it shares, usually itself)."""
        dataset, plans = self.data_of(arm)
        return os.path.join(self.run_dir(self.suite.training_arm(arm), seed), "results", dataset,
                            f"{arm.trainer}__{plans}__{self.suite.configuration}")

    def resolved_options(self, arm: Arm, seed: int) -> Dict[str, str]:
        """The arm's options with every ``@arm:NAME`` value replaced by arm NAME's model folder of the same seed."""
        return {k: self.model_dir(self.suite.arm(ref), seed) if ref else v
                for k, v in arm.options.items() for ref in [arm_reference(v)]}

    def train(self, arm: Arm, seed: int, status: Callable[[str], None]) -> Dict[str, Any]:
        first = self.suite.training_arm(arm)
        if first is not arm:  # same training as an earlier arm (trained before it): only predicted differently
            return {**self.train(first, seed, status), "skipped": True, "shared_with": first.name}
        key = self.suite.run_key(arm, seed)
        rdir = self.run_dir(arm, seed)
        path = os.path.join(rdir, "train.json")
        rec = done(path, key)
        if rec:
            return {**rec, "skipped": True}
        old = _load(path)
        if old is not None and old.get("key") != key:  # the arm changed: start this run over
            shutil.rmtree(rdir, ignore_errors=True)
        os.makedirs(rdir, exist_ok=True)
        fold_dir = os.path.join(self.model_dir(arm, seed), f"fold_{self.suite.fold}")
        resume = os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")) and \
            _load(os.path.join(rdir, "started.json")) == {"key": key}
        if not resume:
            shutil.rmtree(os.path.join(rdir, "results"), ignore_errors=True)
        atomic_write_json({"key": key}, os.path.join(rdir, "started.json"))
        dataset, plans = self.data_of(arm)
        cmd = [sys.executable, "-m", "nnx.bench.train_run", str(seed), dataset, self.suite.configuration,
               str(self.suite.fold), "-tr", arm.trainer, "-p", plans, "-device", self.device]
        opts = self.resolved_options(arm, seed)
        if "save_every" not in opts and str(opts.get("epochs", "")).isdigit():
            # checkpoint_latest.pth five times per run (nnU-Net: every 50 epochs), so a killed run resumes; it does
            # not change the result, so it is not part of the run's key
            opts["save_every"] = str(max(1, int(opts["epochs"]) // 5))
        if opts:
            cmd += ["--opt"] + [f"{k}={v}" for k, v in opts.items()]
        if resume:
            cmd.append("--c")
        env = dict(os.environ, nnUNet_results=os.path.join(rdir, "results"))
        if self.device == "cpu":
            env["nnUNet_n_proc_DA"] = "0"
        epochs = arm.options.get("epochs", "?")
        t0 = time.time()
        with open(os.path.join(rdir, "train.log"), "a") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                    preexec_fn=_die_with_parent)
            last = ""
            for line in proc.stdout:
                log.write(line)
                if line.strip():
                    last = line.strip()
                m = _EPOCH.search(line)
                if m:
                    status(f"epoch {int(m.group(1)) + 1}/{epochs}")
            rc = proc.wait()
        if rc != 0:
            raise NNXError(f"training of arm '{arm.name}' seed {seed} failed (exit {rc}): {last[:300]}",
                           os.path.join(rdir, "train.log"))
        rec = {"key": key, "arm": arm.name, "trainer": arm.trainer, "options": arm.options, "seed": seed,
               "train_s": time.time() - t0, "resumed": resume, "model_dir": self.model_dir(arm, seed)}
        atomic_write_json(rec, path)
        return rec

    # -- prediction and evaluation ---------------------------------------------------------------------------------
    def _test_path(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.join(self.raw_folder(), p)

    def predict(self, arm: Arm, seed: int) -> Optional[Dict[str, Any]]:
        if self.suite.test["source"] != "test":
            return None
        t = self.suite.test
        key = self.suite.predict_key(arm, seed)
        rdir = self.run_dir(arm, seed)
        path = os.path.join(rdir, "predict.json")
        rec = done(path, key)
        if rec:
            return {**rec, "skipped": True}
        from nnx import checks, inference_inputs
        from nnx.cli.predict import predict_folder
        from nnx.io_utils import read_json
        import torch
        mdir = self.model_dir(arm, seed)
        dataset_json = read_json(os.path.join(mdir, "dataset.json"), "dataset.json")
        images = self._test_path(t["images"])
        cases = checks.check_image_folder(images, dataset_json, purpose="benchmark test images")
        chk = "checkpoint_final.pth"
        inputs = inference_inputs.model_inputs(mdir, [self.suite.fold], chk)
        wanted = {i["name"] for i in inputs}
        folders = {k: self._test_path(v) for k, v in t["inputs"].items() if k in wanted}
        inference_inputs.check_input_folders(cases, images, folders, inputs, dataset_json["file_ending"])
        options = inference_inputs.inference_option_overrides(arm.trainer, arm.predict_options)
        pred = os.path.join(rdir, "pred")
        shutil.rmtree(pred, ignore_errors=True)
        os.makedirs(rdir, exist_ok=True)  # an arm that shares another arm's training has no run folder yet
        from nnx.ext_path import ensure_ext_trainer_env
        ensure_ext_trainer_env()  # the predictor finds the trainer class by name, as stock nnU-Net does
        import contextlib
        t0 = time.time()
        with open(os.path.join(rdir, "predict.log"), "w") as log, contextlib.redirect_stdout(log):
            predict_folder(images, pred, mdir, [self.suite.fold], chk, torch.device(self.device),
                           float(t["step_size"]), bool(t["tta"]), progress=False, inputs=inputs,
                           input_folders=folders, cases=cases, options=options)
        wall = time.time() - t0
        rec = {"key": key, "cases": len(cases), "predict_s": wall, "s_per_case": wall / max(1, len(cases)),
               "tta": bool(t["tta"])}
        atomic_write_json(rec, path)
        return rec

    def evaluate(self, arm: Optional[Arm], seed: int, folder: Optional[str] = None, name: Optional[str] = None) \
            -> Dict[str, Any]:
        """Dice and CC-Dice of a run's predictions (or of a reference folder: ``folder`` + ``name``)."""
        from nnx.io_utils import read_json
        t = self.suite.test
        dj = read_json(os.path.join(os.environ["nnUNet_preprocessed"], self.dataset, "dataset.json"), "dataset.json")
        if arm is not None:
            key = self.suite.predict_key(arm, seed)
            edir = self.run_dir(arm, seed)
            if t["source"] == "test":
                pred, ref = os.path.join(edir, "pred"), self._test_path(t["labels"])
            else:
                pred = os.path.join(self.model_dir(arm, seed), f"fold_{self.suite.fold}", "validation")
                ref = os.path.join(os.environ["nnUNet_preprocessed"], self.dataset, "gt_segmentations")
        else:
            key = digest({"data": self.suite.data_key(), "test": t, "folder": folder})
            edir = os.path.join(self.out, "references", re.sub(r"[^A-Za-z0-9_.+-]", "_", name))
            pred, ref = self._test_path(folder), self._test_path(t["labels"])
        path = os.path.join(edir, "eval.json")
        rec = done(path, key)
        if rec:
            return {**rec, "skipped": True}
        from nnx import checks
        from nnx.cc_evaluation import cc_summary_for_folder
        from nnx.cli.common import default_processes
        from nnx.cli.evaluate import evaluate_folder, reader_writer_for
        checks.check_prediction_folder(ref, pred, dj["file_ending"], dj["labels"])
        os.makedirs(edir, exist_ok=True)
        summary_file = os.path.join(edir, "summary.json")
        rw = reader_writer_for(pred, dj)
        n_cases = len([f for f in os.listdir(pred) if f.endswith(dj["file_ending"])])
        n = min(default_processes(), max(1, n_cases // 8))  # a worker process costs more than a few small cases
        evaluate_folder(ref, pred, dj, summary_file, n, rw)
        summary, _ = cc_summary_for_folder(ref, pred, dj, summary_file, rw, n, progress=False)
        rec = {"key": key, **metrics_from_summary(summary, dj["labels"])}
        atomic_write_json(rec, path)
        return rec


def metrics_from_summary(summary: dict, labels: Dict[str, Any]) -> Dict[str, Any]:
    """Foreground-mean Dice and CC-Dice, and the Dice of every named class, from an nnx_evaluate summary."""
    per_class = {}
    for name, val in labels.items():
        if name in ("background", "ignore"):
            continue
        key = str(tuple(val)) if isinstance(val, list) else str(val)
        m = summary["mean"].get(key, summary["mean"].get(val if not isinstance(val, list) else key))
        if m is not None:
            per_class[name] = float(m["Dice"])
    fg = summary["foreground_mean"]
    return {"dice": float(fg["Dice"]), "cc_dice": float(fg["CC_Dice"]) if "CC_Dice" in fg else None,
            "per_class_dice": per_class, "cases": len(summary.get("metric_per_case", []))}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    from nnx.bench.measure import _die_with_parent as f
    f()
