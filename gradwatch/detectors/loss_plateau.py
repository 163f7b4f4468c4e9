"""``loss_plateau``: the loss stopped improving for a patience window."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA
from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class LossPlateau(Detector):
    """The smoothed training loss has not improved by ``min_delta`` (relative) for ``patience`` steps.

    Formula: ``L`` = EMA (alpha 0.95) of the loss; an improvement is ``L < L_best * (1 - min_delta)``
    (1%); fires after ``patience`` (200) steps without one. Like ``ReduceLROnPlateau``'s relative
    threshold mode, on the training loss and in steps.

    Severity: ``warning`` when the loss is still near where it started (``L >= L_0 - 0.1 |L_0|``: the model is
    not learning at all — learning rate far too low, dead network, frozen weights); ``info`` otherwise
    (converged: decay the learning rate or stop). Evidence: loss, loss_best, loss_initial, steps. Not run
    with ``loss="surrogate"`` (a policy-gradient or GAN loss need not improve on a healthy run).
    """

    rule = "loss_plateau"
    assumes = (
        "The loss is a progress measure that improves by 1% (relative) within 200 steps while the model "
        "learns. Not run on a surrogate loss."
    )
    loss_kinds = ("minimize", "signed")
    state_fields = ("loss", "best", "initial", "since")
    advice = (
        "The loss has stopped improving. If it is stuck near its starting value the model is not learning: "
        "the learning rate is far too low (or far too high and bouncing), units are dead, weights are frozen, "
        "or the inputs/labels are broken. If it is well below the start, training has converged at this "
        "learning rate: decay it (a schedule or ReduceLROnPlateau) or stop early."
    )

    def __init__(self, patience: int = 200, min_delta: float = 0.01, warmup_steps: int = 10) -> None:
        self.patience = check_count("LossPlateau", "patience", patience, example=200)
        self.min_delta = check_threshold("LossPlateau", "min_delta", min_delta, low=-1e-12, example=0.01)
        self.warmup_steps = int(
            check_threshold("LossPlateau", "warmup_steps", warmup_steps, low=-1, example=10)
        )
        self.loss = EMA(0.95)
        self.best = math.inf
        self.initial = math.nan
        self.since = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.loss is None or not math.isfinite(rec.loss):
                continue
            self.loss.update(rec.loss)
            if self.loss.n < self.warmup_steps:
                continue
            L = self.loss.mean
            if math.isnan(self.initial):
                self.initial = L
            if L < self.best - self.min_delta * abs(self.best) or self.best == math.inf:
                self.best = L
                self.since = 0
                if "plateau" in self.active:
                    out += self.resolve(
                        "plateau", rec.step, rec.epoch, None, f"loss improving again: {L:.4g}"
                    )
                continue
            self.since += 1
            if self.since >= self.patience:
                stuck = L >= self.initial - 0.1 * abs(self.initial)  # signed losses too
                severity = Severity.WARNING if stuck else Severity.INFO
                evidence = {
                    "loss": L,
                    "loss_best": self.best,
                    "loss_initial": self.initial,
                    "steps": float(self.since),
                }
                where = (
                    "still near its initial value" if stuck else "well below its initial value (converged?)"
                )
                message = (
                    f"training loss has not improved by {self.min_delta:.0%} for {self.since} steps: "
                    f"{L:.4g} vs best {self.best:.4g}, {where} {self.initial:.4g}"
                )
                out += self.report(
                    "plateau", self.finding(severity, rec.step, rec.epoch, None, message, evidence)
                )
        return out
