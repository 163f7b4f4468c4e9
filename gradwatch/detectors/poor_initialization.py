"""``poor_initialization``: activation scale explodes or collapses through depth at the start."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class PoorInitialization(Detector):
    """At the first checks, the std of Linear/Conv outputs grows or shrinks geometrically with depth.

    Statistic: the std ``s_0`` of the input batch and ``s_1 .. s_k`` of the Linear/Conv outputs
    (pre-activations) in module order, leaving out the model's last Linear/Conv (its logits are the
    loss's business), at the first scheduled step if it comes within ``max_step`` (10) steps — before
    training has changed the weights much. With ``k >= 2``, the per-layer factor is
    ``f = (s_k / s_0) ** (1 / k)`` (measured from the input, so raw inputs are the
    ``unnormalized_inputs`` rule's, not this one's). Fires when ``f >= factor`` (2.5) or
    ``f <= 1 / factor``, and ``s_k / s_0`` is beyond ``factor ** 2`` either way, or when any output std
    exceeds ``1e3`` times the input's.
    N(0, 1) weights multiply the scale by about ``sqrt(fan_in / 2)`` per ReLU layer (8x at width 128);
    PyTorch's default and He/Xavier keep ``f`` near 0.4-1.

    Severity: warning (critical when ``s_k / s_0`` is beyond 1e4 either way). Layer: the module with the
    most extreme std. Evidence: std_input, std_last, factor_per_layer, layers.
    """

    rule = "poor_initialization"
    state_fields = ("seen",)
    advice = (
        "Activation scale changes by a large factor at every layer, so signals explode or vanish with depth "
        "and gradients follow. This is the classic N(0,1) (or too-small) weight initialization. Use He "
        "(Kaiming) initialization for ReLU-family layers and Xavier/Glorot for tanh/sigmoid "
        "(torch.nn.init.kaiming_normal_ / xavier_uniform_), or add normalization layers."
    )

    def __init__(self, factor: float = 2.5, max_step: int = 10) -> None:
        self.factor = check_threshold("PoorInitialization", "factor", factor, low=1.0, example=2.5)
        self.max_step = check_count("PoorInitialization", "max_step", max_step, low=-1, example=10)
        self.seen = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        linear = [(n, a) for n, a in stats.activations.items() if a.kind == "linear"][:-1]
        if not stats.activations or stats.inputs is None:
            return []
        self.seen += 1
        if self.seen > 1 or step > self.max_step or len(linear) < 2:
            return []
        stds = [stats.inputs.std] + [a.std for _, a in linear]
        if not all(math.isfinite(s) and s > 0 for s in stds):
            return []
        linear = [("inputs", None), *linear]
        total = stds[-1] / stds[0]
        per_layer = total ** (1 / (len(stds) - 1))
        extreme_i = max(range(1, len(stds)), key=lambda i: abs(math.log(stds[i] / stds[0])))
        huge = max(stds) > 1e3 * stds[0]
        grows = per_layer >= self.factor and total >= self.factor**2
        shrinks = per_layer <= 1 / self.factor and total <= 1 / self.factor**2
        if not (grows or shrinks or huge):
            return []
        severity = Severity.CRITICAL if total >= 1e4 or total <= 1e-4 else Severity.WARNING
        direction = "grows" if total > 1 else "shrinks"
        layer = linear[extreme_i][0]
        evidence = {
            "std_first": stds[0],
            "std_last": stds[-1],
            "factor_per_layer": per_layer,
            "layers": float(len(stds)),
        }
        message = (
            f"pre-activation std {direction} {per_layer:.2f}x per layer through {len(stds) - 1} Linear/Conv layers: "
            f"{stds[0]:.3g} at the input -> {stds[-1]:.3g} at {linear[-1][0]}"
        )
        return self.report("init", self.finding(severity, step, stats.epoch, layer, message, evidence))
