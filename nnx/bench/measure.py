"""Speed and memory of every arm on the same plans, measured interleaved in one run.

Each arm's trainer lives in its own worker process (:mod:`nnx.bench.stepper`), so its peak memory is its own.
After every worker has warmed up, the coordinator runs ``rounds`` rounds; in each round every arm runs ``steps``
training iterations in turn (the order rotates from round to round), so slow phases of a noisy machine hit every
arm alike. The speed ratio of an arm is the median over rounds of (its mean iteration time in the round / the stock
trainer's in the same round). ``mode: sequential`` runs the workers one after the other instead (for GPUs that do
not hold every arm at once); its ratios are then not interleaved and the report says so.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

from nnx.errors import NNXError


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: no orphaned workers
    except Exception:  # noqa: BLE001 - not Linux: the worker ends when its stdin closes
        pass


class Worker:
    def __init__(self, spec: Dict[str, Any], log_path: str, env: Dict[str, str]):
        self.spec = spec
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "nnx.bench.stepper", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, preexec_fn=_die_with_parent if os.name == "posix" else None)

    def read(self) -> Dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"error": f"worker exited (code {self.proc.returncode}): {self.last_log_line()}"}
        return json.loads(line)

    def send(self, cmd: str, **kw) -> Dict[str, Any]:
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return {"error": f"worker is gone: {self.last_log_line()}"}
        return self.read()

    def last_log_line(self) -> str:
        self._log.flush()
        try:
            with open(self.log_path) as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][:300] if lines else "no output"

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=60)
            except Exception:  # noqa: BLE001
                self.proc.kill()
        self._log.close()


def worker_env(results_dir: str, device: str) -> Dict[str, str]:
    from nnx.ext_path import SHIM_DIR
    env = dict(os.environ, nnUNet_results=results_dir)
    env["nnUNet_extTrainer"] = SHIM_DIR
    if device == "cpu":
        env["nnUNet_n_proc_DA"] = "0"  # augmentation in the stepping process: data time is measured, not hidden
    return env


def measure_arms(arms: List[Dict[str, Any]], common: Dict[str, Any], work_dir: str, steps: int, rounds: int,
                 infer: int, mode: str = "interleaved", progress: Optional[Callable[[str], None]] = None,
                 stock: Optional[str] = None, group: int = 0) -> Dict[str, Dict[str, Any]]:
    """``arms``: [{"name", "trainer", "options"}]; ``common``: dataset, plans, configuration, fold, device, seed,
    warmup. Returns name -> measurements (``error`` set for an arm that could not run).

    ``group`` > 1 (interleaved mode): at most that many worker processes at once, the ``stock`` arm in every group;
    an arm's speed ratio then uses the stock rounds of its own group (``ref_round_iter_s``)."""
    os.makedirs(work_dir, exist_ok=True)
    results_dir = os.path.join(work_dir, "tmp_results")
    shutil.rmtree(results_dir, ignore_errors=True)
    env = worker_env(results_dir, common.get("device", "cpu"))
    tick = progress or (lambda msg: None)
    try:
        if mode == "interleaved" and stock and group > 1 and len(arms) > group:
            st = next(a for a in arms if a["name"] == stock)
            others = [a for a in arms if a["name"] != stock]
            chunks = [others[i:i + group - 1] for i in range(0, len(others), group - 1)]
            out: Dict[str, Dict[str, Any]] = {}
            for k, chunk in enumerate(chunks):
                res = _measure_set([st] + chunk, common, work_dir, env, steps, rounds, infer, mode, tick,
                                   f".group{k + 1}")
                s_res = res.pop(stock)
                for name, r in res.items():
                    r["ref_round_iter_s"] = list(s_res["round_iter_s"])
                    r["group"] = k + 1
                out.update(res)
                agg = out.setdefault(stock, {**s_res, "iter_s": [], "data_s": [], "step_s": [], "round_iter_s": [],
                                             "infer_s": [], "other_cores": [], "group": "all"})
                for key in ("iter_s", "data_s", "step_s", "round_iter_s", "infer_s", "other_cores"):
                    agg[key] += s_res.get(key, [])
                peaks = [x for x in (agg.get("peak_gb"), s_res.get("peak_gb")) if x is not None]
                agg["peak_gb"] = max(peaks) if peaks else None
                if s_res.get("error"):
                    agg["error"] = s_res["error"]
            return {a["name"]: out[a["name"]] for a in arms}
        return _measure_set(arms, common, work_dir, env, steps, rounds, infer, mode, tick, "")
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)


def _measure_set(arms, common, work_dir, env, steps, rounds, infer, mode, tick, log_suffix):
    out: Dict[str, Dict[str, Any]] = {a["name"]: {"trainer": a["trainer"], "options": a["options"], "iter_s": [],
                                                  "data_s": [], "step_s": [], "round_iter_s": []} for a in arms}

    def start(a):
        spec = dict(common, trainer=a["trainer"], options=a["options"])
        return Worker(spec, os.path.join(work_dir, f"{a['name'].replace(' ', '_')}{log_suffix}.log"), env)

    def ready(a, w):
        msg = w.read()
        if not msg.get("ready"):
            out[a["name"]]["error"] = msg.get("error", "not ready")
            w.close()
            return False
        out[a["name"]].update({k: msg[k] for k in ("init_s", "static_gb", "batch_size", "patch_size")})
        tick(f"{a['name']}: ready")
        return True

    def run_round(a, w):
        res = w.send("steps", n=steps)
        if "error" in res:
            out[a["name"]]["error"] = res["error"]
            return False
        o = out[a["name"]]
        iters = [d + s for d, s in zip(res["data_s"], res["step_s"])]
        o["data_s"] += res["data_s"]
        o["step_s"] += res["step_s"]
        o["iter_s"] += iters
        o["round_iter_s"].append(sum(iters) / len(iters))
        if res.get("other_cores") is not None:
            o.setdefault("other_cores", []).append(res["other_cores"])
            o["cpus"] = res.get("cpus")
        return True

    def finish(a, w):
        o = out[a["name"]]
        if "error" not in o:
            mem = w.send("memory")
            o["peak_gb"], o["memory_method"] = mem.get("peak_gb"), mem.get("method", mem.get("error"))
            if infer:
                res = w.send("infer", n=infer)
                if "error" in res:
                    o["error"] = f"inference: {res['error']}"
                else:
                    o["infer_s"] = res["infer_s"]
        w.close()

    workers: Dict[str, Worker] = {}
    try:
        if mode == "interleaved":
            workers = {a["name"]: start(a) for a in arms}  # start together: imports overlap
            alive = [a for a in arms if ready(a, workers[a["name"]])]
            for r in range(rounds):
                order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
                for a in order:
                    if "error" not in out[a["name"]] and run_round(a, workers[a["name"]]):
                        tick(f"round {r + 1}/{rounds}: {a['name']}")
            for a in alive:
                finish(a, workers[a["name"]])
        elif mode == "sequential":
            for a in arms:
                w = workers[a["name"]] = start(a)
                if ready(a, w):
                    for r in range(rounds):
                        if run_round(a, w):
                            tick(f"{a['name']}: round {r + 1}/{rounds}")
                    finish(a, w)
        else:
            raise NNXError(f"unknown measure mode {mode!r}")
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
            if not w._log.closed:
                w._log.close()
    for o in out.values():
        o["mode"] = mode
    return out
