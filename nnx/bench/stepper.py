"""A measurement worker: one trainer, in its own process, stepping when the coordinator says so.

    python -m nnx.bench.stepper '{"dataset": ..., "plans": ..., "configuration": ..., "fold": 0,
                                 "trainer": ..., "options": {...}, "device": "cpu", "seed": 0, "warmup": 2}'

The worker builds the trainer exactly as nnU-Net's training does (``on_train_start``: initialize, data loaders,
splits), runs ``warmup`` training steps (optimizer state, allocator, cudnn plans), answers ``ready`` and then reads
one JSON command per line on stdin:

``{"cmd": "steps", "n": N}``  N training iterations (next batch + ``train_step``), timed one by one; the reply also
                              says how many cores other processes kept busy meanwhile (``nnx.bench.cpu_load``)
``{"cmd": "infer", "n": N}``  N forward passes of the network in eval mode on one patch (batch 1, no grad), timed
``{"cmd": "memory"}``         the peak memory of this process so far (see below)
``{"cmd": "quit"}``

Replies are JSON lines on the original stdout; everything the trainer prints goes to stderr. One trainer per
process keeps the memory figure clean: on CUDA ``torch.cuda.max_memory_allocated`` (weights, optimizer state,
activations, everything allocated through PyTorch), on CPU the rise of the peak resident set size from just before
the trainer is built (``VmHWM`` after ``/proc/self/clear_refs``): weights, optimizer state, loader buffers and
activations, without the interpreter and the imported libraries.
"""
from __future__ import annotations

import json
import os
import sys
import time

from nnx.bench.cpu_load import OtherLoad
from nnx.memory_probe import _reset_peak_rss, _status_kb


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_trainer(spec: dict):
    """The trainer of ``spec`` with its options applied, after ``on_train_start`` and one epoch start."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnx import options as nnx_options
    from nnx.registry import is_nnx_trainer, load_trainer
    cls = load_trainer(spec["trainer"])
    raw = dict(spec.get("options") or {})
    values = nnx_options.resolve(cls, raw, "nnx_bench")
    os.environ[nnx_options.ENV_VAR] = " ".join(f"{k}={v}" for k, v in raw.items())
    os.environ[nnx_options.SOURCE_ENV_VAR] = "nnx_bench"
    pp = os.path.join(os.environ["nnUNet_preprocessed"], spec["dataset"])
    plans = load_json(os.path.join(pp, spec["plans"] + ".json"))
    plans["continue_training"] = False  # nnU-Net's run_training sets this key; the constructor reads it
    trainer = cls(plans, spec["configuration"], spec.get("fold", 0), load_json(os.path.join(pp, "dataset.json")),
                  torch.device(spec.get("device", "cpu")))
    if not is_nnx_trainer(cls):
        nnx_options.apply(trainer, values, "nnx_bench")
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    return trainer


def static_bytes(trainer) -> int:
    """Bytes of every parameter and buffer of the trainer's modules and of its optimizer state (exact)."""
    import torch
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for value in vars(trainer).values():
        if isinstance(value, torch.nn.Module):
            for t in list(value.parameters()) + list(value.buffers()):
                add(t)
        elif isinstance(value, torch.optim.Optimizer):
            for state in value.state.values():
                for t in state.values():
                    add(t)
    return total


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # replies; the trainer's prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import random
        import numpy as np
        import torch
        seed = int(spec.get("seed", 0))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        device = torch.device(spec.get("device", "cpu"))
        if device.type == "cpu":
            from nnx.cli.common import cpu_threads
            torch.set_num_threads(cpu_threads())
        from nnx.registry import load_trainer
        load_trainer(spec["trainer"])  # imports done before the memory baseline
        cpu_baseline = _reset_peak_rss()
        rss0 = _status_kb("VmRSS") if os.path.exists("/proc/self/status") else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer = build_trainer(spec)
        for _ in range(int(spec.get("warmup", 1))):
            trainer.train_step(next(trainer.dataloader_train))
        _sync(device)
        reply({"ready": True, "init_s": round(time.perf_counter() - t0, 3), "static_gb": static_bytes(trainer) / 1024 ** 3,
               "batch_size": int(trainer.batch_size),
               "patch_size": [int(p) for p in trainer.configuration_manager.patch_size]})
    except BaseException as e:  # noqa: BLE001 - reported to the coordinator as one line
        reply({"ready": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
        return 1

    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "steps":
                data_s, step_s = [], []
                with OtherLoad() as load:
                    for _ in range(int(cmd["n"])):
                        a = time.perf_counter()
                        batch = next(trainer.dataloader_train)
                        b = time.perf_counter()
                        trainer.train_step(batch)  # returns the loss on the CPU: synchronised
                        _sync(device)
                        c = time.perf_counter()
                        data_s.append(b - a)
                        step_s.append(c - b)
                reply({"data_s": data_s, "step_s": step_s, "other_cores": load.cores, "cpus": load.cpus})
            elif cmd["cmd"] == "infer":
                reply({"infer_s": infer_times(trainer, int(cmd["n"]), device)})
            elif cmd["cmd"] == "memory":
                if device.type == "cuda":
                    peak, method = torch.cuda.max_memory_allocated() / 1024 ** 3, "torch.cuda.max_memory_allocated"
                elif cpu_baseline:
                    peak = (_status_kb("VmHWM") - rss0) / 1024 ** 2
                    method = "peak RSS rise from trainer construction (VmHWM)"
                else:
                    peak, method = float("nan"), "unavailable (/proc/self/clear_refs not writable)"
                reply({"peak_gb": peak, "method": method})
            elif cmd["cmd"] == "quit":
                reply({"bye": True})
                break
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except BaseException as e:  # noqa: BLE001
            reply({"error": f"{type(e).__name__}: {' '.join(str(e).split())}"})
            return 1
    try:
        trainer.on_train_end()
    except Exception:  # noqa: BLE001 - cleanup only
        pass
    return 0


def infer_times(trainer, n: int, device) -> list:
    """Forward passes of the eval-mode network (``trainer.network``, or what an nnx trainer's ``nnx_eval_network``
    puts there: what the predictor runs per sliding-window tile) on one patch of a real batch, deep supervision off
    as in nnU-Net's predictor."""
    import contextlib
    import torch
    batch = next(trainer.dataloader_train)
    x = batch["data"][:1].to(device)
    out = []
    with getattr(trainer, "nnx_eval_network", contextlib.nullcontext)():
        net = trainer.network
        trainer.set_deep_supervision_enabled(False)
        net.eval()
        try:
            with torch.no_grad():
                net(x)  # warm-up
                for _ in range(n):
                    _sync(device)
                    a = time.perf_counter()
                    net(x)
                    _sync(device)
                    out.append(time.perf_counter() - a)
        finally:
            net.train()
            if trainer.enable_deep_supervision:
                trainer.set_deep_supervision_enabled(True)
    return out


if __name__ == "__main__":
    sys.exit(main())
