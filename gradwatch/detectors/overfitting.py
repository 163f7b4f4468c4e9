"""``overfitting``: validation loss rising while training loss keeps falling."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA
from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class Overfitting(Detector):
    """Over several validation runs, the validation loss climbs away from its best while training improves.

    Formula: on each validation, ``V`` = validation loss, ``V_best`` its minimum so far and ``T_best``
    the smoothed training loss (EMA alpha 0.9) at that time. Fires when ``V >= V_best * (1 + margin)``
    (margin 0.1, SageMaker's 10% gap) and the training loss is below ``T_best`` on ``patience`` (2)
    consecutive validations, while training is really progressing (``T`` below 90% of its level at the
    first validation) and validation loss above training loss — a diverging or recovering run's
    validation loss also moves, and that is not overfitting.
    Evidence includes the generalization gap ``(V - T) / T``.

    Severity: warning. Evidence: val_loss, val_best, train_loss, gap, validations.
    """

    rule = "overfitting"
    assumes = (
        "A validation loss is logged (`val_loss` or `val_loss_key`) for the same objective as the training "
        "loss, and lower is better for both."
    )
    state_fields = ("train", "val_best", "train_at_best", "train_first", "streak")
    advice = (
        "Validation loss is rising while training loss keeps falling: the model is memorizing the training "
        "set. Stop early and keep the best weights, add regularization (dropout, weight decay, data "
        "augmentation), use more data or a smaller model, or lower the learning rate later in training."
    )

    def __init__(self, margin: float = 0.1, patience: int = 2) -> None:
        self.margin = check_threshold("Overfitting", "margin", margin, low=-1e-12, example=0.1)
        self.patience = check_count("Overfitting", "patience", patience, example=2)
        self.train = EMA(0.9)
        self.val_best = math.inf
        self.train_at_best = math.inf
        self.train_first: float | None = None
        self.streak = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        for rec in stats.steps:
            if rec.loss is not None and math.isfinite(rec.loss):
                self.train.update(rec.loss)
        v = stats.val_loss
        if v is None or not math.isfinite(v) or self.train.n == 0:
            return []
        t = self.train.mean
        if self.train_first is None:
            self.train_first = t
        if v < self.val_best:
            self.val_best, self.train_at_best = v, t
            self.streak = 0
            return self.resolve(
                "overfit", step, stats.epoch, None, f"validation loss improving again: {v:.4g}"
            )
        progressing = t < 0.9 * self.train_first
        overfit = v >= self.val_best * (1 + self.margin) and t < self.train_at_best and progressing and v > t
        self.streak = self.streak + 1 if overfit else 0
        if self.streak < self.patience:
            return []
        gap = (v - t) / t if t > 0 else math.inf
        evidence = {
            "val_loss": v,
            "val_best": self.val_best,
            "train_loss": t,
            "gap": gap,
            "validations": float(self.streak),
        }
        above = f"{v / self.val_best - 1:.0%}" if self.val_best > 0 else "now"
        message = (
            f"validation loss {v:.4g} is {above} above its best {self.val_best:.4g} while "
            f"training loss fell to {t:.4g} (from {self.train_at_best:.4g}); gap (val-train)/train = {gap:.2f}"
        )
        return self.report(
            "overfit", self.finding(Severity.WARNING, step, stats.epoch, None, message, evidence)
        )
