"""nnx_bench: suite validation, statistics, and one small resumable benchmark run end to end."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import TINY_ID, run_cli

BENCH = [sys.executable, "-m", "nnx.cli.bench"]


# -- statistics ----------------------------------------------------------------------------------------------------


def test_mean_std_and_delta_against_hand_values():
    from nnx.bench import stats
    a = stats.mean_std([0.70, 0.74, 0.72])
    b = stats.mean_std([0.60, 0.62, 0.64])
    assert a["mean"] == pytest.approx(0.72) and a["std"] == pytest.approx(0.02)
    assert b["mean"] == pytest.approx(0.62) and b["std"] == pytest.approx(0.02)
    d = stats.delta(a, b)
    assert d["delta"] == pytest.approx(0.10)
    assert d["spread"] == pytest.approx(math.sqrt(0.02 ** 2 + 0.02 ** 2))
    assert d["exceeds_spread"] is True
    close = stats.delta(stats.mean_std([0.63, 0.61, 0.65]), b)  # delta 0.01 < spread 0.028
    assert close["exceeds_spread"] is False
    one = stats.delta(stats.mean_std([0.9]), stats.mean_std([0.5]))  # one seed cannot tell
    assert one["delta"] == pytest.approx(0.4) and one["exceeds_spread"] is None
    ref = stats.delta(stats.mean_std([0.65]), b, arm_is_reference=True)  # a reference has no seed spread
    assert ref["spread"] == pytest.approx(0.02) and ref["exceeds_spread"] is True
    assert stats.mean_std([float("nan"), 0.5])["n"] == 1


def test_speed_ratio_is_the_median_of_per_round_ratios():
    from nnx.bench import stats
    # the machine slows down in round 2 for both arms: per-round ratios stay 1.5, 1.5, 2.0
    assert stats.round_ratio([1.5, 3.0, 2.0], [1.0, 2.0, 1.0]) == pytest.approx(1.5)
    table = stats.speed_memory_table({
        "stock": {"trainer": "nnUNetTrainer", "iter_s": [1.0, 2.0, 1.0], "round_iter_s": [1.0, 2.0, 1.0],
                  "data_s": [0.1] * 3, "infer_s": [0.2, 0.2], "peak_gb": 2.0, "static_gb": 0.1},
        "two nets": {"trainer": "X", "iter_s": [1.5, 3.0, 2.0], "round_iter_s": [1.5, 3.0, 2.0],
                     "data_s": [0.1] * 3, "infer_s": [0.2, 0.2], "peak_gb": 3.0, "static_gb": 0.2}}, "stock")
    assert table["stock"]["speed_ratio"] == 1.0 and table["stock"]["memory_ratio"] == 1.0
    assert table["two nets"]["speed_ratio"] == pytest.approx(1.5)
    assert table["two nets"]["memory_ratio"] == pytest.approx(1.5)
    assert table["two nets"]["inference_ratio"] == pytest.approx(1.0)
    assert table["two nets"]["s_per_iter"] == pytest.approx(2.0)
    # measured in a group of its own: paired with that group's stock rounds, not the stock arm's pooled rounds
    grouped = stats.speed_memory_table({
        "stock": {"trainer": "nnUNetTrainer", "round_iter_s": [1.0, 1.0, 4.0, 4.0]},
        "late": {"trainer": "X", "round_iter_s": [8.0, 8.0], "ref_round_iter_s": [4.0, 4.0]}}, "stock")
    assert grouped["late"]["speed_ratio"] == pytest.approx(2.0)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc/stat (Linux)")
def test_other_load_sees_a_busy_neighbour_but_not_its_own_children(tmp_path):
    from nnx.bench import cpu_load
    spin = tmp_path / "spin.py"
    spin.write_text("import time\nt = time.time()\nwhile time.time() - t < 2.5: pass\n")
    # a neighbour that is not this process's descendant: started by a shell that exits at once
    subprocess.run(["sh", "-c", f"'{sys.executable}' '{spin}' >/dev/null 2>&1 &"], check=True)
    time.sleep(0.3)
    with cpu_load.OtherLoad() as busy:
        time.sleep(1.5)
    assert busy.cpus >= 1 and busy.cores is not None
    assert busy.cores >= 0.6                             # one core spinning beside a sleeping measurement
    time.sleep(1.0)                                      # the neighbour has ended
    child = subprocess.Popen([sys.executable, str(spin)])  # this process's own child (e.g. an augmentation worker)
    try:
        time.sleep(0.3)
        own0, t0 = cpu_load._own_cpu(), time.perf_counter()
        time.sleep(1.5)
        own = (cpu_load._own_cpu() - own0) / (time.perf_counter() - t0)
    finally:
        child.wait()
    assert own >= 0.3                                    # the child's CPU counts as this process's own, not other


def test_other_load_subtracts_its_own_cpu_time(monkeypatch):
    from nnx.bench import cpu_load
    clock = {"busy": iter([100.0, 103.0]), "own": iter([5.0, 7.0, 7.0, 7.0]), "wall": iter([50.0, 52.0, 52.0, 53.0])}
    monkeypatch.setattr(cpu_load, "_busy_seconds", lambda: next(clock["busy"]))
    monkeypatch.setattr(cpu_load, "_own_cpu", lambda: next(clock["own"]))
    monkeypatch.setattr(cpu_load, "_wall", lambda: next(clock["wall"]))
    with cpu_load.OtherLoad() as load:
        pass
    assert load.cores == pytest.approx(0.5)             # (3 s busy - 2 s own) / 2 s wall
    monkeypatch.setattr(cpu_load, "_busy_seconds", lambda: None)  # no /proc/stat: no figure, no warning
    with cpu_load.OtherLoad() as load:
        pass
    assert load.cores is None


def test_busy_warning_names_the_arms_timed_beside_other_jobs():
    from nnx.bench import stats
    from nnx.bench.cpu_load import busy_warning
    m = {"round_iter_s": [1.0], "iter_s": [1.0]}
    table = stats.speed_memory_table({
        "stock": {"trainer": "nnUNetTrainer", **m, "other_cores": [0.0, 0.1], "cpus": 2},
        "busy": {"trainer": "X", **m, "other_cores": [0.9, 1.1], "cpus": 2},
        "wide": {"trainer": "Y", **m, "other_cores": [1.0, 1.0], "cpus": 16},   # 1 of 16 cores: below 25 %
        "old": {"trainer": "Z", **m}}, "stock")                                  # measured before: no figure
    assert table["busy"]["other_cores"] == pytest.approx(1.0) and table["old"]["other_cores"] is None
    warn = busy_warning(table)
    assert "busy 1.0" in warn and "stock" not in warn and "wide" not in warn and "old" not in warn
    assert busy_warning({"stock": table["stock"], "old": table["old"]}) is None


# -- suites --------------------------------------------------------------------------------------------------------


def _suite(**over):
    s = {"name": "t", "dataset": {"id": TINY_ID}, "training": {"epochs": 1},
         "arms": [{"name": "stock", "trainer": "nnUNetTrainer"}]}
    s.update(over)
    return s


@pytest.mark.parametrize("change, message", [
    ({"arms": [{"trainer": "RotNPCTrainer"}]}, "no arm runs the stock nnUNetTrainer"),
    ({"arms": [{"trainer": "nnUNetTrainr"}]}, "unknown trainer 'nnUNetTrainr'; closest registered: nnUNetTrainer"),
    ({"arms": ["nnUNetTrainer", {"trainer": "nnxInputsTrainer", "options": {"inputs": ""}}]},
     "option 'inputs' must name one or more"),
    ({"arms": ["nnUNetTrainer", {"name": "b", "trainer": "nnUNetTrainer", "options": {"epoch": 3}}]},
     "unknown option 'epoch'"),
    ({"arms": ["nnUNetTrainer", "nnUNetTrainer"]}, "two arms are named 'nnUNetTrainer'"),
    ({"training": {}}, "'training.epochs' is required"),
    ({"seeds": 0}, "'seeds' must be an integer >= 1"),
    ({"dataset": {"id": 1, "phantom": "tiny"}}, "exactly one of 'id'"),
    ({"dataset": {"phantom": "huge"}}, "unknown phantom preset 'huge'"),
    ({"baseline": "nope"}, "'baseline' 'nope' is not an arm"),
    ({"measure": {"mode": "parallel"}}, "'measure.mode' must be one of"),
    ({"tset": {}}, "unknown key(s) tset"),
    ({"test": {"source": "validation"}, "references": {"c": "coarseTs"}}, "'references' need a test set"),
])
def test_bad_suites_give_one_line_errors(change, message):
    from nnx.bench.suite import parse_suite
    from nnx.errors import NNXError
    with pytest.raises(NNXError) as e:
        parse_suite(_suite(**change), "suite.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("suite.yaml: ")


def test_suite_defaults_and_option_merging():
    from nnx.bench.suite import parse_suite
    s = parse_suite(_suite(labels={"labeled": "50%"}, training={"epochs": 2, "iters_per_epoch": 3},
                           arms=["nnUNetTrainer", {"name": "mine", "trainer": "nnUNetTrainer",
                                                   "options": {"epochs": 4, "initial_lr": 0.001}}]), "s")
    assert s.baseline == "nnUNetTrainer" and s.stock_arm.name == "nnUNetTrainer"
    assert s.arm("nnUNetTrainer").options == {"epochs": "2", "iters_per_epoch": "3", "labeled": "50%"}
    assert s.arm("mine").options == {"epochs": "4", "iters_per_epoch": "3", "labeled": "50%", "initial_lr": "0.001"}
    assert s.plans["identifier"] == "nnUNetPlans" and s.test["images"] == "imagesTs" and s.test["tta"] is True
    assert s.run_key(s.arm("mine"), 0) != s.run_key(s.arm("mine"), 1) != s.run_key(s.arm("nnUNetTrainer"), 1)


def test_builtin_overhead_suite_covers_every_registered_trainer():
    from nnx.bench.suite import builtin_suites, load_suite
    from nnx.registry import trainer_names
    assert "overhead" in builtin_suites()
    s = load_suite("overhead")
    assert s.mode == "overhead" and [a.trainer for a in s.arms] == trainer_names()
    assert s.dataset["phantom"] == "tiny"


def test_cli_rejects_a_bad_suite_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: {id: 1}\ntraining: {epochs: 1}\narms: [RotNPCTrainer]\n")
    r = run_cli(BENCH + [str(bad), "--out", str(tmp_path / "o")])
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0] and "no arm runs the stock nnUNetTrainer" in err[0]
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [x\n")
    r = run_cli(BENCH + [str(broken)])
    assert r.returncode == 2 and "broken.yaml: not valid YAML" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(BENCH + ["no_such_suite"])
    assert r.returncode == 2 and "unknown suite 'no_such_suite'" in r.stderr and "overhead" in r.stderr


# -- a whole benchmark, killed and resumed -------------------------------------------------------------------------

SUITE = """\
name: mini
description: two arms of the stock trainer (different learning rates), two seeds, coarse masks as a reference
dataset: {id: %d}
configuration: 2d
training: {epochs: 1, iters_per_epoch: 2, val_iters: 1}
seeds: 2
test: {tta: false}
references: {coarse masks: coarseTs}
arms:
  - nnUNetTrainer
  - {name: low lr, trainer: nnUNetTrainer, options: {initial_lr: 0.001}}
measure: {steps: 1, rounds: 2, warmup: 1, infer: 1}
""" % TINY_ID


@pytest.mark.slow
def test_bench_runs_resumes_after_a_kill_and_reports(tiny_planned, tmp_path):
    suite = tmp_path / "mini.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    cmd = BENCH + [str(suite), "--out", str(out), "--device", "cpu"]
    first = out / "runs" / "nnUNetTrainer" / "seed0" / "train.json"
    # the suite's plans default to nnUNetPlans; its 2d is not preprocessed, so the bench plans on the CPU: under
    # nnx's own name, leaving nnU-Net's plans file alone
    stock_plans = os.path.join(os.environ["nnUNet_preprocessed"], tiny_planned, "nnUNetPlans.json")
    stock_before = open(stock_plans, "rb").read()
    # 1) killed (SIGKILL, no cleanup) once the first training has finished
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    t0 = time.time()
    while not first.exists():
        assert proc.poll() is None, "the bench ended before its first training finished"
        assert time.time() - t0 < 400, "first training did not finish in time"
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    record = first.read_text()
    # 2) the same command continues: the finished run is not trained again
    r = run_cli(cmd, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "train nnUNetTrainer seed 0" in r.stdout and "(already done)" in r.stdout
    assert first.read_text() == record
    assert open(stock_plans, "rb").read() == stock_before
    assert "plans nnxPlans_nnUNetTrainer_cpu" in (out / "results.md").read_text()
    res = json.loads((out / "results.json").read_text())
    acc = res["accuracy"]
    assert set(acc) == {"nnUNetTrainer", "low lr", "coarse masks"}
    for arm in ("nnUNetTrainer", "low lr"):
        assert acc[arm]["dice"]["n"] == 2 and acc[arm]["dice"]["std"] is not None
        assert 0.0 <= acc[arm]["dice"]["mean"] <= 1.0
    assert acc["coarse masks"]["kind"] == "reference"
    assert 0.4 < acc["coarse masks"]["dice"]["mean"] < 0.9  # the phantom's coarse masks are made at Dice 0.65
    assert acc["coarse masks"]["dice_vs_baseline"]["exceeds_spread"] in (True, False)
    sm = res["speed_memory"]
    assert sm["nnUNetTrainer"]["speed_ratio"] == 1.0 and sm["nnUNetTrainer"]["memory_ratio"] == 1.0
    assert sm["low lr"]["speed_ratio"] > 0 and sm["low lr"]["peak_gb"] > 0 and sm["low lr"]["infer_s_per_patch"] > 0
    if os.path.exists("/proc/stat"):  # the workers report how busy the other processes kept the CPUs
        assert all(r["other_cores"] is not None and r["other_cores"] >= 0 and r["cpus"] >= 1 for r in sm.values())
    assert res["predict"]["nnUNetTrainer"]["ratio"] == 1.0
    for png in ("accuracy.png", "overhead.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| coarse masks (reference) |" in md and "| low lr | nnUNetTrainer |" in md
    # 3) once more: nothing left to do
    r = run_cli(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("(already done)") == 4 + 4 + 4 + 1  # trainings, predictions, evaluations, reference
    assert "speed + memory: already done" in r.stdout
    # 4) the same runs judged on the fold's validation predictions instead: nothing is trained again
    suite.write_text(SUITE.replace("test: {tta: false}\nreferences: {coarse masks: coarseTs}",
                                   "test: {source: validation}"))
    r = run_cli(cmd, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("(already done)") == 4 and "speed + memory: already done" in r.stdout
    assert "] predict" not in r.stdout and r.stdout.count("] evaluate") == 4
    val = json.loads((out / "results.json").read_text())
    assert val["accuracy"]["nnUNetTrainer"]["dice"]["n"] == 2 and val["predict"] is None
    assert "coarse masks" not in val["accuracy"]
