"""``lr_collapsed``: the learning rate fell to almost nothing while the loss is still far from learned."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA
from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class LRCollapsed(Detector):
    """The learning rate the optimizer steps with is below ``ratio`` (1e-3) of the highest it reached,
    while the training loss has made less than ``progress`` (50%) of the way from its start to zero.

    The classic cause is a per-epoch scheduler stepped every batch (``"interval": "step"`` for a
    ``StepLR(step_size=30)`` or ``CosineAnnealingLR(T_max=epochs)``, or ``scheduler.step()`` inside the
    batch loop): the schedule meant for 30 epochs runs out in 30 batches and training stops learning
    in its first epoch. A schedule that anneals to zero at the end of training does so with the loss
    well below its start, which the progress test leaves alone; a warm-up that starts near zero is
    below its peak before the peak exists, so it is not judged either.

    Formula: ``lr_max`` = the highest LR seen; ``L`` = EMA (alpha 0.9) of the loss, ``L_0`` its value
    after ``warmup_steps`` (10) steps. Fires when ``lr <= ratio * lr_max`` and ``L > (1 - progress) *
    L_0`` for a positive loss that is minimized. Judged on ``loss="minimize"`` runs only (a signed or
    surrogate loss gives no scale for "learned"). Uses the LR of the first param group of the first
    optimizer, as recorded every step. One episode until the loss has made that progress (a per-batch
    cosine rises and falls again). Severity: warning. Evidence: lr, lr_max, loss, loss_initial.
    """

    rule = "lr_collapsed"
    assumes = (
        "The LR of the first param group of the first optimizer is the run's; a positive minimized loss whose "
        'value at the start gives the scale of "learned".'
    )
    loss_kinds = ("minimize",)
    state_fields = ("lr_max", "loss", "initial", "steps")
    advice = (
        "The learning rate is ~0 while the model has barely learned: most often a per-epoch scheduler is "
        'stepped every batch. In Lightning, return the scheduler with "interval": "epoch" (the default) '
        'instead of "step", or size it in steps (T_max / step_size = total optimizer steps); in a plain '
        "loop, call scheduler.step() once per epoch. Check the LR curve in TensorBoard."
    )

    def __init__(self, ratio: float = 1e-3, progress: float = 0.5, warmup_steps: int = 10) -> None:
        self.ratio = check_threshold("LRCollapsed", "ratio", ratio, example=1e-3)
        self.progress = check_threshold("LRCollapsed", "progress", progress, example=0.5)
        self.warmup_steps = check_count("LRCollapsed", "warmup_steps", warmup_steps, low=-1, example=10)
        self.lr_max = 0.0
        self.loss = EMA(0.9)
        self.initial = math.nan
        self.steps = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for rec in stats.steps:
            if rec.loss is not None and math.isfinite(rec.loss):
                self.loss.update(rec.loss)
            self.steps += 1
            if self.steps == self.warmup_steps and self.loss.n:
                self.initial = self.loss.mean
            lr = rec.lr
            if lr is None or not math.isfinite(lr) or lr < 0:
                continue
            self.lr_max = max(self.lr_max, lr)
            L, L0 = self.loss.mean, self.initial
            if math.isnan(L0) or L0 <= 0 or self.lr_max <= 0:
                continue
            unlearned = L > (1 - self.progress) * L0
            if lr <= self.ratio * self.lr_max and unlearned:
                evidence = {"lr": lr, "lr_max": self.lr_max, "loss": L, "loss_initial": L0}
                message = (
                    f"the learning rate fell to {lr:.3g}, {lr / self.lr_max:.2g}x the {self.lr_max:.3g} it "
                    f"reached, while the loss is still {L:.4g} (it started at {L0:.4g})"
                )
                out += self.report(
                    "collapsed", self.finding(Severity.WARNING, rec.step, rec.epoch, None, message, evidence)
                )
            elif "collapsed" in self.active and not unlearned:  # (an LR rising again may fall again)
                out += self.resolve("collapsed", rec.step, rec.epoch, None, f"the loss is learning: {L:.4g}")
        return out
