"""``saturated_activations``: tanh/sigmoid outputs pinned on their flat parts."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class SaturatedActivations(Detector):
    """A large fraction of a tanh/sigmoid module's outputs sit where its derivative is ~0.

    Statistic: per ``nn.Tanh``/``nn.Sigmoid`` (and Hardtanh/Hardsigmoid) module on scheduled steps,
    the fraction of outputs with ``|y| > 0.99`` (tanh) or ``y < 0.01 or y > 0.99`` (sigmoid).
    Fires when it exceeds ``threshold`` (0.5; SageMaker Debugger's and DeepDiagnosis' default) on
    ``persist`` (2) consecutive checks, or exceeds ``0.9`` on one. Functional ``torch.tanh`` calls are
    not judged (their module is unknown); their Linear's ``saturated_frac`` is logged for reading. A
    module called after several layers is judged per call, as ``tanh@fc1``, ``tanh@fc2``, ...

    Severity: warning. Layer: the module. Evidence: saturated_frac, std, max_abs.
    """

    rule = "saturated_activations"
    assumes = (
        "tanh/sigmoid modules (and their hard variants): an output beyond 0.99 passes almost no gradient, so "
        "most outputs there for two checks is a fault, not a phase."
    )
    state_fields = ("streaks",)
    advice = (
        "Most outputs of this activation sit on its flat parts, where the gradient is ~0, so the layers "
        "before it stop learning. Usual causes: weights initialized too large (N(0,1) instead of Xavier), "
        "unnormalized inputs, or a learning rate that pushed pre-activations far out. Use Xavier/Glorot "
        "initialization for tanh/sigmoid, normalize inputs, add BatchNorm/LayerNorm before the activation, "
        "or switch to ReLU-family activations."
    )

    def __init__(self, threshold: float = 0.5, persist: int = 2) -> None:
        self.threshold = check_threshold("SaturatedActivations", "threshold", threshold, example=0.5)
        self.persist = check_count("SaturatedActivations", "persist", persist, example=2)
        self.streaks: dict[str, int] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        for name, a in stats.activations.items():
            if a.kind not in ("tanh", "sigmoid") or not math.isfinite(a.mean):
                continue
            frac = a.saturated_frac
            if frac <= self.threshold:
                self.streaks.pop(name, None)
                out += self.resolve(
                    name, step, stats.epoch, name, f"{name}: saturated fraction down to {frac:.0%}"
                )
                continue
            self.streaks[name] = streak = self.streaks.get(name, 0) + 1
            if streak >= self.persist or frac > 0.9:
                message = f"{frac:.0%} of {name}'s {a.kind} outputs are saturated (std {a.std:.3g}, max |y| {a.max_abs:.3g})"
                evidence = {"saturated_frac": frac, "std": a.std, "max_abs": a.max_abs}
                out += self.report(
                    name, self.finding(Severity.WARNING, step, stats.epoch, name, message, evidence)
                )
        return out
