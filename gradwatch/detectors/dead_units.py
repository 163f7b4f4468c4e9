"""``dead_units``: ReLU units that never activate."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector, check_count, check_threshold
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class DeadUnits(Detector):
    """Most units (features/channels) of a ReLU layer output zero for (almost) every sample.

    Statistic: per ReLU module on scheduled steps, ``dead_unit_frac`` = the fraction of units that are
    non-zero on fewer than 1% of the batch's samples (and spatial positions, for convolutions) —
    SageMaker Debugger's "active less than 1% of the time". For models with no activation modules at
    all (``F.relu`` inside ``forward``), the Linear/Conv pre-activations stand in (units ``> 0`` on fewer
    than 1% of samples), except the model's last Linear/Conv, whose outputs are not followed by a ReLU.
    A ReLU module called after several layers (one ``self.act`` after fc1, fc2, fc3) is judged per call,
    as ``act@fc1``, ``act@fc2``, ...: the Linear/Conv that fed each call, seen in the forward pass.

    Fires when the fraction exceeds ``threshold`` (0.5; SageMaker Debugger: units inactive in > 50% of
    a layer) on ``persist`` (2) consecutive checks — a dead unit stays dead, a sleepy one does not —
    or at once when every unit of the layer is dead (its weights get no gradient at all: a bias
    initialized far below zero is caught at step 0, before training spends steps on a dead layer).
    Severity: warning; critical when ``>= 0.95`` of the layer is dead. Evidence: dead_unit_frac, zero_frac.
    Source for the score: ReDo (Sokar et al., 2023) calls a unit dormant below 0.025 of the layer mean.
    """

    rule = "dead_units"
    assumes = (
        "A ReLU unit should be active on some samples of a batch; one silent on 99% of them passes no "
        "gradient. Small batches make the fraction noisy, hence two checks (or every unit dead at once)."
    )
    state_fields = ("streaks",)
    advice = (
        "These ReLU units output zero for every input, so they pass no gradient and never recover: the "
        "learning rate was too high (a large update pushed their biases negative), the initialization "
        "was poor, or inputs are unnormalized. Lower the learning rate, use He (Kaiming) initialization, "
        "normalize inputs, add BatchNorm, or use LeakyReLU/GELU; re-initializing the dead units can revive "
        "the layer."
    )

    def __init__(self, threshold: float = 0.5, persist: int = 2) -> None:
        self.threshold = check_threshold("DeadUnits", "threshold", threshold, example=0.5)
        self.persist = check_count("DeadUnits", "persist", persist, example=2)
        self.streaks: dict[str, int] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        acts = stats.activations
        watched = [n for n, a in acts.items() if a.kind == "relu"]
        if not watched and not any(a.kind in ("tanh", "sigmoid", "other") for a in acts.values()):
            watched = [n for n, a in acts.items() if a.kind == "linear"][:-1]  # functional ReLUs
        out: list[Finding] = []
        for name in watched:
            a = acts[name]
            if not (math.isfinite(a.mean) and math.isfinite(a.std)):
                continue  # NaN outputs are "never > 0" but not dead: the nonfinite rule's business
            frac = a.dead_unit_frac
            if frac <= self.threshold:
                self.streaks.pop(name, None)
                out += self.resolve(name, step, stats.epoch, name, f"{name}: dead units down to {frac:.0%}")
                continue
            self.streaks[name] = streak = self.streaks.get(name, 0) + 1
            if streak >= self.persist or frac >= 1.0:  # every unit dead: no gradient can revive them
                severity = Severity.CRITICAL if frac >= 0.95 else Severity.WARNING
                message = f"{frac:.0%} of {name}'s units are active on fewer than 1% of samples (zeros overall: {a.zero_frac:.0%})"
                evidence = {"dead_unit_frac": frac, "zero_frac": a.zero_frac, "checks": float(streak)}
                out += self.report(name, self.finding(severity, step, stats.epoch, name, message, evidence))
        return out
