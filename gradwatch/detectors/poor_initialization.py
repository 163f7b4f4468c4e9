"""``poor_initialization``: activation scale explodes or collapses through depth at the start."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


def hidden_layers(activations: dict) -> list:
    """The Linear/Conv outputs that are pre-activations: those an activation module follows in module
    order. With no activation modules at all (``F.relu`` in ``forward``), every Linear/Conv but the
    last. An output head is left out either way: a one-unit regression head (or a second head) has a
    small std by design, which made PyTorch's default init look like a collapse."""
    items = list(activations.items())
    if not any(a.kind != "linear" for _, a in items):
        return [(n, a) for n, a in items if a.kind == "linear"][:-1]
    return [
        (n, a)
        for i, (n, a) in enumerate(items)
        if a.kind == "linear" and i + 1 < len(items) and items[i + 1][1].kind != "linear"
    ]


class PoorInitialization(Detector):
    """At the first checks, the std of Linear/Conv outputs grows or shrinks geometrically with depth.

    Statistic: the std ``s_0`` of the input batch and ``s_1 .. s_k`` of the Linear/Conv outputs
    (pre-activations) in module order that an activation module follows (:func:`hidden_layers`: the
    output heads are the loss's business), at the first scheduled step if it comes within ``max_step`` (10) steps — before
    training has changed the weights much. With ``k >= 2``, the per-layer factor is
    ``f = (s_k / s_0) ** (1 / k)`` (measured from the input, so raw inputs are the
    ``unnormalized_inputs`` rule's, not this one's). Fires when ``f >= factor`` (3) or
    ``f <= 1 / factor``, and ``s_k / s_0`` is beyond ``factor ** 2`` either way, or when any output std
    exceeds ``1e3`` times the input's.
    N(0, 1) weights multiply the scale by about ``sqrt(fan_in / 2)`` per ReLU layer (8x at width 128);
    PyTorch's default and He/Xavier keep ``f`` near 0.4-1: measured on digits, PyTorch's default init
    gives 0.40-0.81 for ReLU, tanh and GELU MLPs of width 32-1024 and depth 3-5 (the lowest, 0.398, GELU
    at width 1024 on standardized inputs), and 0.38 for a regression whose one-unit mean head comes
    before its variance head in module order. Hence 3 (1/3 = 0.33), not 2.5 (0.4): at 2.5 the rule
    called PyTorch's own default a poor initialization, and reinitialize acted on a healthy run.

    Severity: warning (critical when ``s_k / s_0`` is beyond 1e4 either way). Layer: the module with the
    most extreme std. Evidence: std_input, std_last, factor_per_layer, layers.
    """

    rule = "poor_initialization"
    assumes = (
        "Judged once, at the first read within 10 steps: the scale of hidden pre-activations (those an "
        "activation module follows) through depth. PyTorch's default, He and Xavier keep the per-layer factor "
        "at 0.40-0.81 (measured); output heads are left out."
    )
    state_fields = ("seen",)
    advice = (
        "Activation scale changes by a large factor at every layer, so signals explode or vanish with depth "
        "and gradients follow. This is the classic N(0,1) (or too-small) weight initialization. Use He "
        "(Kaiming) initialization for ReLU-family layers and Xavier/Glorot for tanh/sigmoid "
        "(torch.nn.init.kaiming_normal_ / xavier_uniform_), or add normalization layers."
    )

    def __init__(self, factor: float = 3.0, max_step: int = 10) -> None:
        self.factor = check_threshold("PoorInitialization", "factor", factor, low=1.0, example=3.0)
        self.max_step = check_count("PoorInitialization", "max_step", max_step, low=-1, example=10)
        self.seen = 0

    def check(self, step: int, stats: Stats) -> list[Finding]:
        linear = hidden_layers(stats.activations)
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
