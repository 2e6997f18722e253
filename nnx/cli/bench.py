"""``nnx_bench``: train, predict, evaluate and time several trainers side by side on the same plans and data.

    nnx_bench SUITE [--seeds N] [--device cpu|cuda] [--out DIR]
    nnx_bench --list

SUITE is a built-in suite (``overhead``, or one a plugin registers) or a YAML/JSON file (see
:mod:`nnx.bench.suite`). The bench plans once, trains every arm for every seed, predicts the test cases, evaluates
them (Dice, CC-Dice), measures speed and memory of every arm interleaved in one run, and writes results.json,
results.md and PNG plots into the output folder. Rerunning the same command continues where it stopped.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List

from nnx.errors import ArgumentParser, NNXError, cli_entry


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="nnx_bench", description="Benchmark trainers side by side (accuracy, speed, memory).")
    p.add_argument("suite", nargs="?", help="built-in suite name or a .yaml/.yml/.json suite file")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the suite's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device (default: the suite's, else cuda if available, else cpu)")
    p.add_argument("--out", default=None, help="output folder (default ./nnx_bench_<suite name>)")
    p.add_argument("--list", action="store_true", help="list the built-in suites and exit")
    return p


class Progress:
    """A tqdm bar on a terminal, one line per finished step otherwise (logs, CI)."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=True)
        self.what, self.t_step = "", time.time()

    def start(self, what: str) -> None:
        self.what, self.t_step = what, time.time()
        if self.bar is not None:
            self.bar.set_description_str(what)
            self.bar.set_postfix_str("")

    def status(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def done(self, note: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            print(f"nnx_bench: [{self.n}/{self.total}] {self.what}: {note or 'done'} "
                  f"({time.time() - self.t_step:.0f} s)", flush=True)

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"nnx_bench: {text}")
        else:
            print(f"nnx_bench: {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _workspace(out: str, raw: Dict[str, Any]) -> None:
    """Phantom suites keep their data inside the output folder; others use the user's nnUNet_raw/_preprocessed.
    Must run before nnunetv2 is imported (it reads these variables at import time)."""
    ds = raw.get("dataset") or {}
    if isinstance(ds, dict) and "phantom" in ds:
        for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                         ("nnUNet_results", "results")):
            os.environ[var] = os.path.join(out, "workspace", sub)
    else:  # checked after the suite itself (a bad suite file is the first thing to report)
        os.environ.setdefault("nnUNet_results", os.path.join(out, "workspace", "results"))


def list_suites() -> int:
    from nnx.bench import suite as S
    for name, target in sorted(S.builtin_suites().items()):
        try:
            raw = S._load_builtin(name, target)
            desc = raw.get("description", "")
        except NNXError as e:
            desc = f"(cannot load: {e})"
        print(f"{name:<14} {desc}")
    return 0


@cli_entry("nnx_bench")
def main(argv):
    args = build_parser().parse_args(argv)
    if args.list:
        return list_suites()
    if not args.suite:
        raise NNXError("give a suite (a built-in name or a suite file; nnx_bench --list shows the built-in ones)")
    if args.seeds is not None and args.seeds < 1:
        raise NNXError(f"--seeds must be >= 1, got {args.seeds}")
    from nnx.bench.suite import raw_suite
    raw, where = raw_suite(args.suite)
    if args.seeds is not None:
        raw["seeds"] = args.seeds
    out = os.path.abspath(args.out or f"nnx_bench_{raw.get('name', 'suite')}")
    _workspace(out, raw)
    from nnx.bench.suite import parse_suite
    suite = parse_suite(raw, where)
    if "id" in suite.dataset:
        from nnx import checks
        checks.require_env("nnUNet_raw", "nnUNet_preprocessed")
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        os.makedirs(os.environ[var], exist_ok=True)
    os.makedirs(out, exist_ok=True)
    from nnx.cli.common import pick_device
    device = pick_device(args.device or suite.device).type
    if device == "cpu":
        os.environ.setdefault("nnUNet_compile", "0")  # nnU-Net would compile on CPU too; on GPU its default stays
    from nnx.io_utils import atomic_write_json
    atomic_write_json({**suite.to_json(), "device": device}, os.path.join(out, "suite.json"))
    t0 = time.time()
    print(f"nnx_bench: suite '{suite.name}' ({suite.mode}): {len(suite.arms)} arm(s)"
          + (f" x {suite.seeds} seed(s)" if suite.mode == "full" else "") + f", device {device}, output {out}")
    rc = run(suite, out, device)
    print(f"nnx_bench: done in {time.time() - t0:.0f} s; results in {out}")
    return rc


def run(suite, out: str, device: str) -> int:
    from nnx.bench import report, stats
    from nnx.bench.runner import Bench
    from nnx.io_utils import atomic_write_json, atomic_write_text
    full = suite.mode == "full"
    runs = [(a, s) for s in range(suite.seeds) for a in suite.arms] if full else []
    per_run = 3 if suite.test["source"] == "test" else 2
    n_aux = sum(1 for a, _ in runs if not a.evaluated)  # arms on their own dataset: trained only
    prog = Progress(2 + len(runs) * per_run - n_aux * (per_run - 1) + (len(suite.references) if full else 0) + 1)
    bench = Bench(suite, out, device, prog.say)
    try:
        prog.start("dataset")
        bench.prepare_dataset()
        prog.done(bench.dataset)
        prog.start("plan + preprocess")
        bench.prepare_plans()
        if full:
            bench.prepare_arm_datasets()
        prog.done(bench.plans)
        evals: Dict[str, List[Dict[str, Any]]] = {a.name: [] for a in suite.evaluated_arms}
        predicts: Dict[str, List[Dict[str, Any]]] = {a.name: [] for a in suite.evaluated_arms}
        for arm, seed in runs:  # all trainings first, then predictions side by side
            prog.start(f"train {arm.name} seed {seed}")
            rec = bench.train(arm, seed, prog.status)
            if rec.get("shared_with"):
                prog.done(f"the training of {rec['shared_with']}")
            else:
                prog.done(_note(rec, f"{rec['train_s']:.0f} s" + (" (resumed)" if rec.get("resumed") else "")))
        for arm, seed in runs:
            if not arm.evaluated:
                continue
            if per_run == 3:
                prog.start(f"predict {arm.name} seed {seed}")
                rec = bench.predict(arm, seed)
                predicts[arm.name].append(_clean(rec))
                prog.done(_note(rec, f"{rec['s_per_case']:.2f} s/case"))
            prog.start(f"evaluate {arm.name} seed {seed}")
            ev = bench.evaluate(arm, seed)
            evals[arm.name].append({**_clean(ev), "seed": seed})
            prog.done(_note(ev, f"Dice {ev['dice']:.3f}"))
        refs = {}
        if full:
            for name, folder in suite.references.items():
                prog.start(f"reference {name}")
                ev = bench.evaluate(None, 0, folder=folder, name=name)
                refs[name] = _clean(ev)
                prog.done(_note(ev, f"Dice {ev['dice']:.3f}"))
        prog.start("speed + memory")
        measured, cached = measure(suite, bench, device, prog)
        prog.done("already done" if cached else "")
    finally:
        prog.close()

    stock = suite.stock_arm.name
    table = stats.speed_memory_table(measured, stock)
    predict_rows = None
    if full and per_run == 3:
        sp = {a: stats.mean_std([r["s_per_case"] for r in recs])["mean"] for a, recs in predicts.items()}
        predict_rows = {a: {"s_per_case": v, "ratio": stats.ratio(v, sp.get(stock))} for a, v in sp.items()}
    md = [f"# nnx_bench: {suite.name}", "", suite.description, "",
          f"Dataset {bench.dataset}, plans {bench.plans}, configuration {suite.configuration}, fold {suite.fold}, "
          f"device {device}."]
    result: Dict[str, Any] = {"suite": suite.to_json(), "dataset": bench.dataset, "plans": bench.plans,
                              "device": device, "stock": stock, "baseline": suite.baseline, "rules": stats.RULES,
                              "speed_memory": table, "measure_mode": suite.measure["mode"]}
    if full:
        acc = report.accuracy_summary(evals, refs, suite.baseline)
        result.update({"accuracy": acc, "runs": evals, "predict": predict_rows, "references": refs})
        common = {**(suite.raw.get("training") or {}), **(suite.raw.get("labels") or {})}
        opts = ", ".join(f"{k}={v}" for k, v in common.items())
        own = {a.name: {**{k: v for k, v in a.options.items() if str(common.get(k)) != v},
                        **{f"{k} (predict)": v for k, v in a.predict_options.items()}} for a in suite.arms}
        per_arm = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in own.items() if o)
        md += ["", "## Accuracy", "", f"Every arm: {opts}." + (f" Arm options: {per_arm}." if per_arm else ""), "",
               report.accuracy_markdown(acc, suite.baseline, suite.seeds)]
        report.plot_accuracy(os.path.join(out, "accuracy.png"), acc)
    st = table.get(stock, {})
    shape = (f"patch {'x'.join(map(str, st['patch_size']))}, batch {st['batch_size']}; "
             if st.get("patch_size") else "")
    m = suite.measure
    md += ["", "## Speed and memory", "",
           f"{shape}{m['warmup']} warm-up step(s), then {m['rounds']} round(s) of {m['steps']} step(s) per arm; "
           f"{m['infer']} timed forward pass(es)."
           + (f" At most {m['group']} worker processes at once, the stock trainer in every group; each arm's "
              f"ratio is to the stock rounds of its own group." if m["group"] > 1 else ""), "",
           report.speed_markdown(table, stock, m["mode"], predict_rows)]
    from nnx.bench.cpu_load import busy_warning
    busy = busy_warning(table)
    if busy:
        result["speed_warning"] = busy
        md += ["", f"**Warning:** {busy}."]
        print(f"nnx_bench: warning: {busy}", file=sys.stderr)
    report.plot_overhead(os.path.join(out, "overhead.png"), table, stock)
    atomic_write_json(result, os.path.join(out, "results.json"))
    text = "\n".join(md) + "\n"
    atomic_write_text(text, os.path.join(out, "results.md"))
    print(text)
    failed = [n for n, r in table.items() if r.get("error")]
    if failed:
        print(f"nnx_bench: {len(failed)} arm(s) failed to run: {', '.join(failed)} (see {out}/measure/<arm>.log)",
              file=sys.stderr)
        return 1
    return 0


def _clean(rec: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in ("key", "skipped")}


def _note(rec: Dict[str, Any], text: str) -> str:
    return f"{text} (already done)" if rec.get("skipped") else text


def measure(suite, bench, device: str, prog: Progress):
    """(measurements per arm, whether they were already done)"""
    from nnx.bench.measure import measure_arms
    from nnx.bench.runner import done
    from nnx.bench.suite import arm_reference, digest
    from nnx.io_utils import atomic_write_json
    m = suite.measure
    # arms on their own dataset are not measured; "@arm:NAME" options point at seed 0's model of that arm
    # prediction options join the measurement: inference timing runs the network the arm predicts with
    arms = [{"name": a.name, "trainer": a.trainer,
             "options": {**bench.resolved_options(a, 0), **a.measure_options, **a.predict_options}}
            for a in suite.evaluated_arms]
    keyed = [{"name": a.name, "trainer": a.trainer, "options": a.options,
              **({"measure_options": a.measure_options} if a.measure_options else {}),
              **({"predict_options": a.predict_options} if a.predict_options else {}),
              **({"runs": {k: suite.run_key(suite.arm(arm_reference(v)), 0) for k, v in a.options.items()
                           if arm_reference(v)}} if any(arm_reference(v) for v in a.options.values()) else {})}
             for a in suite.evaluated_arms]
    key = digest({"data": suite.data_key(), "arms": keyed, "measure": m, "device": device})
    path = os.path.join(bench.out, "measure", "measure.json")
    rec = done(path, key)
    if rec:
        return rec["arms"], True
    common = {"dataset": bench.dataset, "plans": bench.plans, "configuration": suite.configuration,
              "fold": suite.fold, "device": device, "seed": 0, "warmup": m["warmup"]}
    measured = measure_arms(arms, common, os.path.join(bench.out, "measure"), m["steps"], m["rounds"], m["infer"],
                            m["mode"], progress=prog.status, stock=suite.stock_arm.name, group=m["group"])
    if not any(r.get("error") for r in measured.values()):
        atomic_write_json({"key": key, "arms": measured}, path)
    return measured, False


if __name__ == "__main__":
    raise SystemExit(main())
