"""``gradient_spike``: one-step outlier of the total gradient norm."""

from __future__ import annotations

from gradwatch.detectors._spike import SpikeDetector
from gradwatch.stats import StepRecord


class GradientSpike(SpikeDetector):
    """A single step whose total gradient norm is far above its running baseline.

    Formula: ``z = (log g_t - m) / s`` with ``m``, ``s`` the EMA mean and standard deviation of
    ``log g`` (alpha 0.97, ZClip's default); fires when ``z >= 5`` and ``g_t >= 3 * exp(m)``
    after 25 warm-up steps. ``s`` is the EMA standard deviation (``scale="ema"``), which also holds
    the spread of a rising trend, so the lagging mean of early training does not look like spikes.
    On the zoo's healthy runs (4 seeds) the largest z with a 3x ratio was 4.1 (a OneCycle LR peak).
    The outlier enters the baseline clipped (ZClip). Sources: ZClip
    (Kumar et al., 2025: EMA z-score, alpha 0.97, z 2.5 for clipping), OLMo-core's spike detection.

    Severity: warning; critical at 100x the baseline. Evidence: value, baseline, ratio, z, lr.
    """

    rule = "gradient_spike"
    assumes = (
        "The log of the total gradient norm is roughly stationary over ~30 steps (EMA alpha 0.97): "
        "heavy-tailed, not trending. Measured on the zoo's healthy runs: z 4.1 at most with a 3x ratio (a OneCycle "
        "peak)."
    )
    what = "total gradient norm"
    advice = (
        "One batch produced a gradient far larger than usual: an outlier or corrupted batch, a rare "
        "large-loss example, or an instability starting. A single spike moves the weights by the spike's "
        "size times the learning rate. Clip gradients (adaptive clipping, or gradient_clip_val near the "
        "usual norm), look at the batch at this step, and lower the learning rate if spikes repeat."
    )

    def __init__(
        self, z: float = 5.0, ratio: float = 3.0, alpha: float = 0.97, warmup_steps: int = 25
    ) -> None:
        super().__init__(z=z, ratio=ratio, alpha=alpha, warmup_steps=warmup_steps)

    def value(self, rec: StepRecord) -> float | None:
        return rec.grad_norm if rec.grad_nonfinite == 0 else None
