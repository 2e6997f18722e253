"""Schedules of the cross-teaching family (spec §2, §4.3, §5.2, §7.2), all on nnx's global iteration t.

* cross-supervision weight (Gaussian "sigmoid" ramp-up of Laine & Aila, as in CTS / MCSC):
  ``w_cps(t) = w · exp(−5 (1 − min(t / T_r, 1))²)``, ``T_r`` = ramp length in iterations; the thesis' curve has
  ``T_r = T`` (the whole run): ``w(0) = 0.1·e⁻⁵ ≈ 6.74e-4``, ``w(T) = 0.1``; the MCSC code saturates at 30k of 40k
  iterations (``rampup_fraction = 0.75``);
* per-group poly learning rate ``lr_g(t) = base_g · (1 − t / T)^0.9`` stepped every iteration (nnU-Net's own
  ``PolyLRScheduler`` writes one rate into every group and steps per epoch);
* uncertain fraction of MCSCv2: ``β(t) = β₀ (1 − t / T)``.
"""
from __future__ import annotations

import math
from typing import Sequence


def sigmoid_rampup(t: float, length: float) -> float:
    """``exp(−5 (1 − clip(t / length, 0, 1))²)``; 1 for ``length <= 0``."""
    if length <= 0:
        return 1.0
    p = min(max(float(t) / float(length), 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - p) ** 2))


def cps_weight(t: int, total: int, weight: float = 0.1, rampup_fraction: float = 1.0) -> float:
    """w_cps at iteration ``t`` of ``total``; the ramp saturates after ``rampup_fraction · total`` iterations."""
    return float(weight) * sigmoid_rampup(t, rampup_fraction * total)


def uncertain_fraction(t: int, total: int, beta0: float = 0.2) -> float:
    """β(t) = β₀ (1 − t/T), clipped at 0."""
    return float(beta0) * max(0.0, 1.0 - float(t) / max(float(total), 1.0))


def poly_factor(t: int, total: int, exponent: float = 0.9) -> float:
    return max(0.0, 1.0 - float(t) / max(float(total), 1.0)) ** exponent


class PerGroupPolyLR:
    """Per-iteration poly decay of every parameter group from its own base rate (``group["initial_lr"]``).

    ``step()`` advances one iteration; ``step(t)`` sets iteration ``t``. nnU-Net calls ``lr_scheduler.step(epoch)``
    at every epoch start: the trainer routes that to :meth:`set_iteration` with its own global iteration instead.
    """

    def __init__(self, optimizer, total_iterations: int, exponent: float = 0.9):
        self.optimizer = optimizer
        self.total = max(int(total_iterations), 1)
        self.exponent = float(exponent)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.t = 0
        self.set_iteration(0)

    @property
    def base_lrs(self) -> Sequence[float]:
        return [g["initial_lr"] for g in self.optimizer.param_groups]

    def set_iteration(self, t: int) -> None:
        self.t = int(t)
        f = poly_factor(self.t, self.total, self.exponent)
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, t=None) -> None:
        self.set_iteration(self.t + 1 if t is None else t)

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        return {"t": self.t, "total": self.total, "exponent": self.exponent}

    def load_state_dict(self, state):
        self.total, self.exponent = int(state["total"]), float(state["exponent"])
        self.set_iteration(int(state["t"]))
