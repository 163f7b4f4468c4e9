"""``frozen_weights``: trainable parameters that never change or never get a gradient."""

from __future__ import annotations

from gradwatch.detectors.base import Detector, check_count
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class FrozenWeights(Detector):
    """A layer with ``requires_grad=True`` whose weights do not move, while others do.

    Statistic: per layer on scheduled steps, the gradient norm and the update ratio. Fires when a
    layer's update is exactly 0 on ``persist`` (2) consecutive checks while the model's overall update
    is not, saying whether the layer gets no gradient (a detached branch, an unused module) or gets one
    but is not stepped (learning rate 0, missing from the optimizer).

    Severity: warning. Layer: the frozen layer. Evidence: grad_norm, update_ratio.
    """

    rule = "frozen_weights"
    state_fields = ("streaks",)
    advice = (
        "This layer is trainable but never changes. If it gets no gradient, it is not on the path from "
        "the inputs to the loss (a .detach(), torch.no_grad(), an unused module, or an integer cast); if "
        "it gets a gradient but does not move, its parameters are not in the optimizer or their learning "
        "rate is 0. Fix the graph or the optimizer's param groups, or set requires_grad=False on purpose."
    )

    def __init__(self, persist: int = 2) -> None:
        self.persist = check_count("FrozenWeights", "persist", persist, example=2)
        self.streaks: dict[str, int] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        ratios = stats.update_ratio
        if not ratios or not ratios.get("total", 0) > 0:
            return []
        out: list[Finding] = []
        for name, ratio in ratios.items():
            if name == "total":
                continue
            if ratio != 0:
                self.streaks.pop(name, None)
                out += self.resolve(name, step, stats.epoch, name, f"{name} is being updated again")
                continue
            self.streaks[name] = self.streaks.get(name, 0) + 1
            if self.streaks[name] < self.persist:
                continue
            grad = stats.grad_norm.get(name, 0.0)
            why = (
                "gets no gradient" if grad == 0 else f"gets gradients (norm {grad:.3g}) but is never stepped"
            )
            message = f"{name} has not changed for {self.streaks[name]} checks: it {why}"
            evidence = {"grad_norm": grad, "update_ratio": 0.0}
            out += self.report(
                name, self.finding(Severity.WARNING, step, stats.epoch, name, message, evidence)
            )
        return out
