"""``vanishing_gradients``: early layers get orders of magnitude less gradient than late ones."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class VanishingGradients(Detector):
    """The first layer's gradient norm is a tiny fraction of the last layer's, while the loss stalls.

    Formula (AutoTrainer's rule): with ``g_first`` and ``g_last`` the gradient norms of the first and
    last layers that have weights (``named_parameters`` order), fires when ``g_first / g_last < ratio``
    (1e-3) and ``g_first < floor`` (1e-4), or when every layer's norm is below ``1e-8``; and the mean
    loss of the steps since the last check has not improved by 1% on the check before. It must hold
    on ``persist`` (2) consecutive checks.

    Severity: warning. Layer: the first layer. Evidence: grad_first, grad_last, ratio.
    """

    rule = "vanishing_gradients"
    assumes = (
        "Layers in `named_parameters` order run from input to output; in a deep stack the first layer's "
        "gradient at 1e-3 of the last's, while the loss stalls, means the early layers do not learn."
    )
    state_fields = ("streak", "prev_loss")
    advice = (
        "The early layers receive almost no gradient, so they barely learn: saturating activations "
        "(sigmoid/tanh) stacked deep, poor initialization, or a plain deep stack. Use ReLU-family "
        "activations, He/Xavier initialization instead of N(0,1) or tiny weights, add normalization layers "
        "(BatchNorm/LayerNorm), and prefer architectures with skip connections (residual blocks)."
    )

    def __init__(self, ratio: float = 1e-3, floor: float = 1e-4, persist: int = 2) -> None:
        self.ratio = check_threshold("VanishingGradients", "ratio", ratio, example=1e-3)
        self.floor = check_threshold("VanishingGradients", "floor", floor, example=1e-4)
        self.persist = check_count("VanishingGradients", "persist", persist, example=2)
        self.streak = 0
        self.prev_loss = math.nan

    def check(self, step: int, stats: Stats) -> list[Finding]:
        losses = [r.loss for r in stats.steps if r.loss is not None and math.isfinite(r.loss)]
        loss = sum(losses) / len(losses) if losses else math.nan
        improving = not math.isnan(self.prev_loss) and loss < 0.99 * self.prev_loss
        if not math.isnan(loss):
            self.prev_loss = loss
        # layers with no gradient at all are the frozen_weights rule's
        layers = [n for n, w in stats.weight_norm.items() if w > 0 and stats.grad_norm.get(n, 0) > 0]
        if len(layers) < 2:
            return []
        first, last = layers[0], layers[-1]
        g_first, g_last = stats.grad_norm[first], stats.grad_norm[last]
        if not (math.isfinite(g_first) and math.isfinite(g_last)):
            return []
        tiny = max(stats.grad_norm[n] for n in layers) < 1e-8
        ratio = g_first / g_last if g_last > 0 else math.inf
        vanishing = (ratio < self.ratio and g_first < self.floor) or tiny
        self.streak = self.streak + 1 if vanishing and not improving else 0
        if not vanishing:
            return self.resolve(
                "vanish", step, stats.epoch, first, f"gradient ratio first/last back to {ratio:.2g}"
            )
        if self.streak < self.persist:
            return []
        evidence = {"grad_first": g_first, "grad_last": g_last, "ratio": ratio}
        message = (
            f"first layer {first} gets gradient norm {g_first:.3g}, {ratio:.2g}x the last layer {last} "
            f"({g_last:.3g}), and the loss is not improving"
        )
        return self.report(
            "vanish", self.finding(Severity.WARNING, step, stats.epoch, first, message, evidence)
        )
