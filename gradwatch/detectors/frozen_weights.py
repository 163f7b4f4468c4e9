"""``frozen_weights``: trainable parameters that never change or never get a gradient."""

from __future__ import annotations

from gradwatch.detectors.base import Detector, check_count
from gradwatch.findings import Finding, Severity
from gradwatch.stats import ModelSetup, Stats


class FrozenWeights(Detector):
    """A layer with ``requires_grad=True`` whose weights do not move, while others do.

    Statistic: per layer on scheduled steps, the gradient norm and the update ratio. Fires when a
    layer's update is exactly 0 on ``persist`` (2) consecutive checks while the model's overall update
    is not, saying whether the layer gets no gradient (a detached branch, an unused module) or gets one
    but is not stepped (learning rate 0).

    Left alone: layers frozen on purpose (every parameter ``requires_grad=False`` now, as a fine-tune
    freezes its backbone, also after gradwatch bound to the model), layers that get gradients but that no
    optimizer holds (``unoptimized_parameters`` names those: their gradients are not measured, so "no
    gradient" would be wrong), and layers no optimizer holds whose module is in eval mode (a backbone
    frozen by leaving it out of the optimizer). The gradient norm is measured over the parameters the
    optimizers hold.

    Severity: warning. Layer: the frozen layer. Evidence: grad_norm, update_ratio.
    """

    rule = "frozen_weights"
    state_fields = ("streaks",)
    advice = (
        "This layer is trainable but never changes. If it gets no gradient, it is not on the path from "
        "the inputs to the loss (a .detach(), torch.no_grad(), an unused module, or an integer cast); if "
        "it gets a gradient but does not move, its learning rate is 0 (parameters no optimizer holds are "
        "named by unoptimized_parameters). Fix the graph or the optimizer's param groups, or set "
        "requires_grad=False on purpose: frozen layers are left alone."
    )

    def __init__(self, persist: int = 2) -> None:
        self.persist = check_count("FrozenWeights", "persist", persist, example=2)
        self.streaks: dict[str, int] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        ratios = stats.update_ratio
        if not ratios or not ratios.get("total", 0) > 0:
            return []
        out: list[Finding] = []
        setup = stats.model_setup
        left_alone = _left_alone(setup) if setup is not None else set()
        for name, ratio in ratios.items():
            if name == "total":
                continue
            if name in left_alone:
                self.streaks.pop(name, None)
                out += self.resolve(name, step, stats.epoch, name, f"{name} is frozen on purpose")
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
            if setup is not None and name in setup.unheld_layers:
                why += ", and no optimizer holds it"
            message = f"{name} has not changed for {self.streaks[name]} checks: it {why}"
            evidence = {"grad_norm": grad, "update_ratio": 0.0}
            out += self.report(
                name, self.finding(Severity.WARNING, step, stats.epoch, name, message, evidence)
            )
        return out


def _left_alone(setup: ModelSetup) -> set[str]:
    """Layers frozen on purpose, or that ``unoptimized_parameters`` judges (see the class docstring)."""
    # a layer no optimizer holds is either unoptimized_parameters' (it gets gradients) or not trained by
    # design (an EMA or teacher copy, a target network synced by load_state_dict): never this rule's
    return set(setup.frozen_layers) | set(setup.unheld_layers)
