"""How much of this process's CPUs other processes used while a measurement ran.

Speed ratios are measured in one run because these machines are noisy; a ratio is still wrong when another job
takes cores during some arms' rounds and not others'. A measurement worker wraps its timed steps in
:class:`OtherLoad`: from ``/proc/stat`` (the CPUs this process may run on, ``os.sched_getaffinity``) it takes the
busy time of those CPUs, subtracts its own CPU time and that of its child processes (e.g. augmentation workers), and
divides by the wall time -- the average number of cores other processes kept busy. ``None`` where ``/proc/stat`` is
not readable. (In a container whose ``/proc/stat`` shows the host's CPUs without an affinity mask the figure includes
the host's other jobs: it can only warn too often, never hide contention.)
"""
from __future__ import annotations

import os
import time
from typing import Optional

BUSY_CORES_WARNING = 0.5  # other processes using half a core (or a quarter of the CPUs) or more: timing not clean
BUSY_FRACTION_WARNING = 0.25


def _busy_seconds() -> Optional[float]:
    """Busy (non-idle, non-iowait) time in seconds summed over the CPUs this process may use."""
    try:
        cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                parts = line.split()
                if parts and parts[0] in cpus:
                    v = [int(x) for x in parts[1:9]]  # user nice system idle iowait irq softirq steal
                    busy += sum(v) - v[3] - v[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None


def _descendants_cpu(pid: int) -> float:
    """CPU seconds of the live descendants of ``pid`` (e.g. nnU-Net's augmentation workers), from /proc; 0 where
    /proc does not list children."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            kids = []
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids += [int(k) for k in f.read().split()]
        except (OSError, ValueError):
            continue
        for k in kids:
            try:
                with open(f"/proc/{k}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, ValueError, IndexError):
                continue
            todo.append(k)
    return total


def _own_cpu() -> float:
    """CPU seconds of this process (all threads) and its child processes, live or ended: not 'other' load."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system + _descendants_cpu(os.getpid())


_wall = time.perf_counter


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.cores``: average cores other processes used, or None;
    ``load.cpus``: how many CPUs this process may use."""

    def __enter__(self) -> "OtherLoad":
        self.cores: Optional[float] = None
        self.cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._busy0, self._self0, self._wall0 = _busy_seconds(), _own_cpu(), _wall()
        return self

    def __exit__(self, *exc) -> None:
        busy, own, wall = _busy_seconds(), _own_cpu() - self._self0, _wall() - self._wall0
        if busy is not None and self._busy0 is not None and wall > 0:
            self.cores = max(0.0, (busy - self._busy0 - own) / wall)


def busy_warning(per_arm: dict) -> Optional[str]:
    """One warning line for the arms whose timed rounds ran beside other processes (mean ``other_cores`` of the
    measurement table at or above max(:data:`BUSY_CORES_WARNING`, :data:`BUSY_FRACTION_WARNING` x ``cpus``)),
    else None."""
    busy = {n: r["other_cores"] for n, r in per_arm.items() if r.get("other_cores") is not None
            and r["other_cores"] >= max(BUSY_CORES_WARNING, BUSY_FRACTION_WARNING * (r.get("cpus") or 1))}
    if not busy:
        return None
    arms = ", ".join(f"{n} {c:.1f}" for n, c in busy.items())
    return (f"other processes kept CPU cores busy while these arms were timed (average cores: {arms}); "
            "their speed ratios are not clean: measure again on idle cores")
