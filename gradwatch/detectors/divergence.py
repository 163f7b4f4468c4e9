"""``divergence``: the training loss trends up, far above its best."""

from __future__ import annotations

import math
import statistics

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class Divergence(Detector):
    """The running median of the training loss has risen well above the best it reached, and stays there.

    Formula: ``M`` = median of the last ``window`` (20) losses — a median, so one spiky batch does
    not move it; ``M_best`` its minimum; ``M_0`` its first value. Fires when for ``patience`` (5)
    consecutive steps ``M >= factor * M_best`` (2x, MosaicML's rule) **and** ``M - M_best >= 0.1 * M_0``
    (the rise matters at the scale of the task, so a loss that doubles from 0.01 to 0.02 near
    convergence is not called divergence). Critical when ``M`` is back at or above ``M_0``.

    Evidence: loss (the median), loss_best, loss_initial, ratio.
    """

    rule = "divergence"
    state_fields = ("recent", "best", "initial", "streak")
    advice = (
        "The loss has been climbing away from the best it reached: the learning rate is too high at this "
        "point of training (a schedule that rises too far, warm-up too short), or the optimizer state is "
        "corrupted by earlier spikes. Lower the learning rate, add warm-up or decay, clip gradients, and "
        "roll back to the best checkpoint rather than training on."
    )

    def __init__(self, factor: float = 2.0, patience: int = 5, window: int = 20) -> None:
        self.factor = check_threshold("Divergence", "factor", factor, low=1.0, example=2.0)
        self.patience = check_count("Divergence", "patience", patience, example=5)
        self.window = check_count("Divergence", "window", window, low=2, example=20)
        self.recent: list[float] = []
        self.best = math.inf
        self.initial = math.nan
        self.streak = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.loss is None or not math.isfinite(rec.loss):
                continue
            if not isinstance(self.recent, list):  # a checkpoint may hand back a tuple
                self.recent = list(self.recent)
            recent = self.recent
            recent.append(rec.loss)
            if len(recent) > self.window:
                del recent[: len(recent) - self.window]  # a resumed run may have a smaller window
            elif len(recent) < self.window:
                continue
            m = statistics.median(recent)
            if math.isnan(self.initial):
                self.initial = m
            self.best = min(self.best, m)
            rising = (
                m > self.best and m >= self.factor * self.best and m - self.best >= 0.1 * abs(self.initial)
            )
            self.streak = self.streak + 1 if rising else 0
            if (
                not rising
                and "diverge" in self.active
                and m < self.best + 0.5 * (self.factor - 1) * abs(self.best)
            ):
                out += self.resolve(
                    "diverge", rec.step, rec.epoch, None, f"loss back to {m:.4g} (best {self.best:.4g})"
                )
            if self.streak >= self.patience:
                severity = Severity.CRITICAL if m >= self.initial else Severity.WARNING
                evidence = {
                    "loss": m,
                    "loss_best": self.best,
                    "loss_initial": self.initial,
                    "ratio": m / self.best if self.best != 0 else math.inf,
                }
                message = (
                    f"median training loss of the last {self.window} steps rose to {m:.4g}, "
                    f"{evidence['ratio']:.2f}x its best {self.best:.4g} (initial {self.initial:.4g})"
                )
                out += self.report(
                    "diverge", self.finding(severity, rec.step, rec.epoch, None, message, evidence)
                )
        return out
