"""Peak memory of a few real training steps of a trainer on a planned configuration (one fresh process).

    python -m nnx.memory_probe -d DATASET -p PLANS -c CONFIG -tr TRAINER [-device cpu|cuda] [--steps 3] [-bs N]

Runs the trainer's own ``on_train_start`` / ``on_train_epoch_start`` and ``train_step`` on real batches (results go to
a temporary nnUNet_results, removed afterwards). One warm-up step allocates optimizer state, then the peak is reset
and ``--steps`` steps are measured: on CUDA ``torch.cuda.max_memory_allocated`` (everything allocated, weights
included), on CPU the rise of the peak resident set size over the RSS before the measured steps (Linux
``/proc/self/clear_refs`` + ``VmHWM``; activations and temporaries, not the weights loaded before). Prints one
JSON line: ``{"peak_gb", "method", "device", "batch_size", "patch_size", "steps", "seconds_per_step"}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(dataset: str, plans: str, configuration: str, trainer: str, device: str = "cpu", steps: int = 3,
          batch_size: int = 0) -> dict:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx.registry import load_trainer
    cls = load_trainer(trainer)
    pp = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
    plans_dict = load_json(os.path.join(pp, plans + ".json"))
    if batch_size:
        plans_dict["configurations"][configuration]["batch_size"] = int(batch_size)
    plans_dict["continue_training"] = False
    t = cls(plans_dict, configuration, 0, load_json(os.path.join(pp, "dataset.json")), torch.device(device))
    t.num_epochs = 1
    t.on_train_start()
    t.on_epoch_start()
    t.on_train_epoch_start()
    t.train_step(next(t.dataloader_train))  # warm-up: optimizer state, cudnn plans
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        method = "torch.cuda.max_memory_allocated"
    else:
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
        method = "peak RSS increase (VmHWM - VmRSS before the steps)"
        rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step(next(t.dataloader_train))
    dt = (time.perf_counter() - t0) / max(steps, 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 1024 ** 3
    else:
        peak = (_status_kb("VmHWM") - rss0) / 1024 ** 2
    cm = t.configuration_manager
    out = {"peak_gb": round(peak, 4), "method": method, "device": device, "batch_size": int(t.batch_size),
           "patch_size": [int(p) for p in cm.patch_size], "steps": steps, "seconds_per_step": round(dt, 3),
           "trainer": trainer}
    try:
        t.on_train_end()
    except Exception:  # noqa: BLE001 - cleanup of dataloader workers only
        pass
    return out


def run_probe(dataset: str, plans: str, configuration: str, trainer: str, device: str = "cpu", steps: int = 3,
              batch_size: int = 0, timeout: int = 1800) -> dict:
    """:func:`probe` in a fresh subprocess (clean peak measures); raises NNXError with its last error line."""
    import subprocess
    from nnx.errors import NNXError
    tmp = tempfile.mkdtemp(prefix="nnx_probe_")
    env = dict(os.environ, nnUNet_results=tmp, nnUNet_n_proc_DA="0", nnUNet_compile=os.environ.get("nnUNet_compile", "0"))
    from nnx.ext_path import SHIM_DIR
    env["nnUNet_extTrainer"] = SHIM_DIR
    cmd = [sys.executable, "-m", "nnx.memory_probe", "-d", dataset, "-p", plans, "-c", configuration, "-tr", trainer,
           "-device", device, "--steps", str(steps), "-bs", str(batch_size)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        err = [ln for ln in (r.stderr or r.stdout).strip().splitlines() if ln.strip()]
        raise NNXError(f"memory probe of {trainer} ({configuration}, batch {batch_size or 'planned'}) failed: "
                       f"{err[-1] if err else 'no output'}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnx.memory_probe")
    p.add_argument("-d", required=True)
    p.add_argument("-p", required=True)
    p.add_argument("-c", required=True)
    p.add_argument("-tr", required=True)
    p.add_argument("-device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("-bs", type=int, default=0)
    a = p.parse_args(argv)
    res = probe(a.d, a.p, a.c, a.tr, a.device, a.steps, a.bs)
    sys.stdout.flush()
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
