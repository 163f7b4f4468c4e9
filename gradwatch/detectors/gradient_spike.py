"""``gradient_spike``: one-step outlier of the total gradient norm."""

from __future__ import annotations

from gradwatch.detectors._spike import SpikeDetector
from gradwatch.stats import StepRecord


class GradientSpike(SpikeDetector):
    """A single step whose total gradient norm is far above its running baseline.

    Formula: ``z = (log g_t - m) / s`` with ``m``, ``s`` the EMA mean and standard deviation of
    ``log g`` (alpha 0.97, ZClip's default); fires when ``z >= 6`` and ``g_t >= 3 * exp(m)``
    after 25 warm-up steps. The outlier enters the baseline clipped (ZClip). Sources: ZClip
    (Kumar et al., 2025: EMA z-score, alpha 0.97, z 2.5 for clipping), OLMo-core's spike detection.

    Severity: warning; critical at 100x the baseline. Evidence: value, baseline, ratio, z, lr.
    """

    rule = "gradient_spike"
    what = "total gradient norm"
    advice = (
        "One batch produced a gradient far larger than usual: an outlier or corrupted batch, a rare "
        "large-loss example, or an instability starting. A single spike moves the weights by the spike's "
        "size times the learning rate. Clip gradients (adaptive clipping, or gradient_clip_val near the "
        "usual norm), look at the batch at this step, and lower the learning rate if spikes repeat."
    )

    def value(self, rec: StepRecord) -> float | None:
        return rec.grad_norm if rec.grad_nonfinite == 0 else None
