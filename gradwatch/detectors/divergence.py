"""``divergence``: the training loss trends up, far above its best."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA
from gradwatch.detectors.base import Detector, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class Divergence(Detector):
    """The smoothed training loss has risen well above the best it reached, and stays there.

    Formula: ``L`` = EMA (alpha 0.9) of the loss; ``L_best`` its minimum after ``warmup_steps``;
    ``L_0`` its value at the end of the warm-up. Fires when for ``patience`` consecutive steps
    ``L >= factor * L_best`` (2x, MosaicML's loss-spike rule) **and** ``L - L_best >= 0.1 * L_0``
    (the rise matters at the scale of the task, so a loss that doubles from 0.01 to 0.02 near
    convergence is not called divergence). Critical when ``L`` is back at or above ``L_0``.

    Evidence: loss, loss_best, loss_initial, ratio.
    """

    rule = "divergence"
    state_fields = ("loss", "best", "initial", "streak")
    advice = (
        "The loss has been climbing away from the best it reached: the learning rate is too high at this "
        "point of training (a schedule that rises too far, warm-up too short), or the optimizer state is "
        "corrupted by earlier spikes. Lower the learning rate, add warm-up or decay, clip gradients, and "
        "roll back to the best checkpoint rather than training on."
    )

    def __init__(self, factor: float = 2.0, patience: int = 10, warmup_steps: int = 10) -> None:
        self.factor = check_threshold("Divergence", "factor", factor, low=1.0, example=2.0)
        self.patience = int(check_threshold("Divergence", "patience", patience, example=10))
        self.warmup_steps = int(
            check_threshold("Divergence", "warmup_steps", warmup_steps, low=-1, example=10)
        )
        self.loss = EMA(0.9)
        self.best = math.inf
        self.initial = math.nan
        self.streak = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.loss is None or not math.isfinite(rec.loss):
                continue
            self.loss.update(rec.loss)
            if self.loss.n < self.warmup_steps:
                continue
            if math.isnan(self.initial):
                self.initial = self.loss.mean
            self.best = min(self.best, self.loss.mean)
            L = self.loss.mean
            rising = L >= self.factor * self.best and L - self.best >= 0.1 * abs(self.initial)
            self.streak = self.streak + 1 if rising else 0
            if not rising and L < self.best + 0.5 * (self.factor - 1) * abs(self.best):
                out += self.resolve(
                    "diverge", rec.step, rec.epoch, None, f"loss back to {L:.4g} (best {self.best:.4g})"
                )
            if self.streak >= self.patience:
                severity = Severity.CRITICAL if L >= self.initial else Severity.WARNING
                evidence = {
                    "loss": L,
                    "loss_best": self.best,
                    "loss_initial": self.initial,
                    "ratio": L / self.best,
                }
                message = (
                    f"smoothed training loss rose to {L:.4g}, {L / self.best:.2f}x its best {self.best:.4g} "
                    f"(initial {self.initial:.4g}) for {self.streak} steps"
                )
                out += self.report(
                    "diverge", self.finding(severity, rec.step, rec.epoch, None, message, evidence)
                )
        return out
