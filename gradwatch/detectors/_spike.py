"""One-step outliers of a positive per-step series against its running baseline (shared by two rules)."""

from __future__ import annotations

import math

from gradwatch.detectors._running import EMA, safe_log
from gradwatch.detectors.base import Detector, check_count, check_fraction, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats, StepRecord


class SpikeDetector(Detector):
    """z-score of ``log(x)`` against an EMA of ``log(x)`` (mean and variance), after a warm-up.

    A step is a spike when ``z >= z`` **and** ``x >= ratio * baseline`` (``baseline = exp(EMA mean)``):
    the z-score alone over-reacts when the series is very smooth, the ratio alone when it is noisy.
    A spike does not enter the baseline as is: the EMA is updated with the value clipped at
    ``z`` standard deviations (ZClip's rule), so a lasting level shift is absorbed gradually.
    Consecutive spike steps are one episode and give one finding.

    ``scale`` picks the standard deviation: ``"ema"``, the EMA variance around the mean (it includes
    a trend's spread, which matches the lag of the mean on a rising series such as early gradient
    norms), or ``"diff"``, half the EMA of squared step-to-step differences (blind to slow trends, so a
    falling loss does not inflate it).
    """

    state_fields = ("ema", "diff_var", "prev")
    what = ""
    scale = "ema"

    def __init__(
        self, z: float = 6.0, ratio: float = 3.0, alpha: float = 0.97, warmup_steps: int = 25
    ) -> None:
        name = type(self).__name__
        self.z = check_threshold(name, "z", z, example=6.0)
        self.ratio = check_threshold(name, "ratio", ratio, low=1.0, example=3.0)
        self.alpha = check_fraction(name, "alpha", alpha, example=0.97)
        self.warmup_steps = check_count(name, "warmup_steps", warmup_steps, low=-1, example=25)
        self.ema = EMA(self.alpha)
        self.diff_var = 0.0
        self.prev = math.nan

    def _std(self) -> float:
        var = self.ema.var if self.scale == "ema" else self.diff_var
        return math.sqrt(max(var, 1e-6))

    def value(self, rec: StepRecord) -> float | None:
        raise NotImplementedError

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        ema, active, a = self.ema, self.active, self.alpha
        for rec in stats.steps:
            x = self.value(rec)
            if x is None or not 0 < x < math.inf:
                continue  # non-finite values (NaN fails both comparisons) are the nonfinite rule's
            lx = safe_log(x)
            if ema.n >= self.warmup_steps and (lx - ema.mean) / self._std() >= self.z:
                z = (lx - ema.mean) / self._std()
                baseline = math.exp(ema.mean)
                if x >= self.ratio * baseline:
                    severity = Severity.CRITICAL if x >= 100 * baseline else Severity.WARNING
                    message = (
                        f"{self.what} jumped to {x:.4g}, {x / baseline:.1f}x its running baseline "
                        f"{baseline:.4g} (z-score {z:.1f} on log scale)"
                    )
                    evidence = {"value": x, "baseline": baseline, "ratio": x / baseline, "z": z}
                    if rec.lr is not None:
                        evidence["lr"] = rec.lr
                    out += self.report(
                        "spike", self.finding(severity, rec.step, rec.epoch, None, message, evidence)
                    )
                    ema.update(ema.mean + self.z * self._std())
                    continue
            if active:
                active.pop("spike", None)
            if not math.isnan(self.prev):
                self.diff_var = a * self.diff_var + (1 - a) * (lx - self.prev) ** 2 / 2
            self.prev = lx
            ema.update(lx)
        return out
