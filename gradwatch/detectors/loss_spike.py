"""``loss_spike``: one-step outlier of the training loss."""

from __future__ import annotations

from gradwatch.detectors._spike import SpikeDetector
from gradwatch.stats import StepRecord


class LossSpike(SpikeDetector):
    """A single step whose training loss is far above its running baseline.

    Formula: as ``gradient_spike`` on ``log(loss)``: ``z >= 5`` and ``loss >= 2 * exp(m)`` (MosaicML's
    2x rule for loss spikes), EMA alpha 0.97, 25 warm-up steps. Losses <= 0 are skipped; with
    ``loss="signed"`` or ``"surrogate"`` the rule is not run. The standard
    deviation is estimated from step-to-step differences (``scale="diff"``): a steadily falling loss
    does not inflate it, so spikes stand out early in training too.

    Severity: warning; critical at 100x the baseline. Evidence: value, baseline, ratio, z, lr.
    """

    rule = "loss_spike"
    assumes = (
        "The loss is positive and minimized, so a spike is a multiple of its level (log scale). Not run for "
        '`loss="signed"` or `"surrogate"`.'
    )
    loss_kinds = ("minimize",)  # log-scale outliers mean nothing for a loss that crosses zero
    what = "training loss"
    advice = (
        "One batch's loss was far above the running level: a corrupted or mislabeled batch, an outlier, "
        "or the first sign of instability (often right after a gradient spike). If it recurs, lower the "
        "learning rate or add warm-up, clip gradients, and inspect the batches at these steps."
    )

    scale = "diff"

    def __init__(
        self, z: float = 5.0, ratio: float = 2.0, alpha: float = 0.97, warmup_steps: int = 25
    ) -> None:
        super().__init__(z=z, ratio=ratio, alpha=alpha, warmup_steps=warmup_steps)

    def value(self, rec: StepRecord) -> float | None:
        return rec.loss
