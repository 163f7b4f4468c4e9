"""``update_ratio``: update-to-weight ratio far from the healthy band for a sustained window."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats

ADVICE_HIGH = (
    "Each step changes these weights by a large fraction of their size (healthy is around 1e-3): the "
    "learning rate is too high for this layer. Lower the learning rate (or this layer's param group), "
    "add warm-up, or clip gradients."
)
ADVICE_LOW = (
    "Each step changes the weights by a tiny fraction of their size (healthy is around 1e-3): the "
    "learning rate is too low (or decayed to ~0), so training crawls. Raise the learning rate, check "
    "the scheduler, or check that the optimizer holds these parameters."
)


class UpdateRatio(Detector):
    """``||w_after - w_before|| / ||w_before||`` of a step, per layer and overall, out of band.

    Band ``[low, high] = [1e-5, 1e-1]`` (DeepDiagnosis; Karpathy's rule of thumb ~1e-3). Fires when
    the overall ratio is below ``low`` while the learning rate is not rising (warm-up is not a fault),
    or when the overall ratio or any single layer's is above ``high``, on ``persist`` (3) consecutive
    checks. Layers whose weights do not move at all are the ``frozen_weights`` rule's.

    Severity: warning. Layer: the worst layer (or None for the overall ratio). Evidence: ratio, band, lr.
    """

    rule = "update_ratio"
    assumes = (
        "A healthy step moves a layer's weights by 1e-5 to 1e-1 of their norm (the rule of thumb is ~1e-3). "
        "Embeddings, biases and norm layers can sit outside that band on healthy runs; the band is not yet "
        "per layer type."
    )
    state_fields = ("streaks", "last_lr")

    def __init__(self, low: float = 1e-5, high: float = 1e-1, persist: int = 3) -> None:
        self.low = check_threshold("UpdateRatio", "low", low, example=1e-5)
        self.high = check_threshold("UpdateRatio", "high", high, example=1e-1)
        self.persist = check_count("UpdateRatio", "persist", persist, example=3)
        self.streaks: dict[str, int] = {}
        self.last_lr: float | None = None

    def _judge(self, key: str, bad: bool, step: int, stats: Stats, finding: Finding | None) -> list[Finding]:
        if not bad:
            self.streaks.pop(key, None)
            return self.resolve(key, step, stats.epoch, None, f"update ratio back in band ({key})")
        self.streaks[key] = self.streaks.get(key, 0) + 1
        if self.streaks[key] >= self.persist and finding is not None:
            return self.report(key, finding)
        return []

    def check(self, step: int, stats: Stats) -> list[Finding]:
        ratios = {n: r for n, r in stats.update_ratio.items() if math.isfinite(r)}
        if "total" not in ratios:
            return []
        lrs = [r.lr for r in stats.steps if r.lr is not None]
        lr = lrs[-1] if lrs else math.nan
        rising = bool(lrs) and (
            lrs[-1] > lrs[0] * 1.01 or (self.last_lr is not None and lr > self.last_lr * 1.01)
        )
        self.last_lr = lr if lrs else self.last_lr
        total = ratios.pop("total")
        evidence = {"ratio": total, "low": self.low, "high": self.high}
        if lrs:
            evidence["lr"] = lr
        out: list[Finding] = []
        low_finding = self.finding(
            Severity.WARNING,
            step,
            stats.epoch,
            None,
            f"weights change by {total:.2g} of their norm per step, below the healthy band [{self.low:g}, {self.high:g}]",
            evidence,
            ADVICE_LOW,
        )
        out += self._judge("low", total < self.low and not rising, step, stats, low_finding)
        moving = {n: r for n, r in ratios.items() if r > 0}
        worst = max(moving, key=moving.get) if moving else None
        high = total > self.high or (worst is not None and moving[worst] > self.high)
        high_finding = None
        if high:
            layer_ratio = moving[worst] if worst else total
            high_finding = self.finding(
                Severity.WARNING,
                step,
                stats.epoch,
                worst,
                f"weights change by {layer_ratio:.2g} of their norm per step in {worst} (overall {total:.2g}), "
                f"above the healthy band [{self.low:g}, {self.high:g}]",
                {**evidence, "layer_ratio": layer_ratio},
                ADVICE_HIGH,
            )
        out += self._judge("high", high, step, stats, high_finding)
        return out
