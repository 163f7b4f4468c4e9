"""``unoptimized_parameters``: parameters that get gradients but no optimizer holds, and optimizers over
tensors the model does not hold."""

from __future__ import annotations

from gradwatch.detectors.base import Detector
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class UnoptimizedParameters(Detector):
    """Parameters of the model with ``requires_grad=True`` that got a gradient but that no optimizer
    holds, or parameters an optimizer holds that belong to no module of the model and get no gradient.

    The first: BatchNorm parameters or biases left out of the optimizer (a weight-decay split that lost
    its no-decay group), a head added after ``configure_optimizers`` or after the optimizer was built.
    They get gradients, so nothing looks wrong, and they never change. The second: an optimizer built
    from another model instance, or before a module was replaced: it steps tensors the forward never uses
    (and the model's own parameters are then the first case).

    Statistic: host-side, the identity of each parameter against every parameter group of every optimizer
    (``id(p)``), worked out at the first read (step 0) and again whenever the optimizers' tensors or the
    number of trainable parameters change (a module swapped in later with neither is not seen); at every
    read, ``p.grad is None`` and the module's mode of what it found. No threshold: any such parameter
    fires, one finding for all of them; the episode lasts while an optimizer still does not hold them. Parameters whose module is in
    eval mode (a backbone frozen by leaving it out of the optimizer) give an ``info`` finding instead:
    frozen on purpose, but its gradients are computed for nothing (``requires_grad=False`` saves the
    backward). Not judged where the optimizers are not known (a bare ``Monitor`` without a context) or
    hold no tensor. Optimizers that train tensors outside the model which do get gradients (an adversarial
    input, a temperature kept as a plain tensor) are fine. Assumes the optimizers hold the model's own
    parameter tensors (plain PyTorch, DDP, FSDP2, Fabric; not DeepSpeed's flat copies).

    Severity: warning (info for parameters in eval-mode modules). Layer: the first layer named. Evidence:
    tensors, elements.
    """

    rule = "unoptimized_parameters"
    assumes = (
        "Every parameter that gets a gradient is meant to be trained by one of the run's optimizers, and "
        "every tensor an optimizer holds is one the model uses. Frozen on purpose: requires_grad=False."
    )
    state_fields = ("flagged",)
    advice = (
        "No optimizer holds these parameters: they get gradients and never change. Build the optimizer "
        "from model.parameters() after the model is complete (a head added later needs its own param "
        "group: optimizer.add_param_group), and when splitting parameters into groups (weight decay on "
        "weights only) keep every group: biases and norm parameters go in the no-decay group. An optimizer "
        "over another model instance's parameters steps tensors the forward never uses: build it from this "
        "model. To freeze parameters on purpose, set requires_grad_(False)."
    )

    def __init__(self) -> None:
        #: episode -> the parameters it named (open while any of them is still held by no optimizer)
        self.flagged: dict[str, list[str]] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        setup = stats.model_setup
        if setup is None or not stats.steps:
            return []
        out: list[Finding] = []
        unheld = setup.unoptimized
        named = {n for names in self.flagged.values() for n in names}
        for key, in_eval in (("unoptimized", False), ("frozen_by_omission", True)):
            still = [n for n in self.flagged.get(key, []) if n in unheld]
            new = [n for n, (_, _, ev, grad) in unheld.items() if grad and ev == in_eval and n not in named]
            if not still and not new:
                self.flagged.pop(key, None)
                out += self.resolve(
                    key, step, stats.epoch, None, "every parameter with a gradient is optimized"
                )
                continue
            self.flagged[key] = still + new
            if key in self.active:
                continue  # one finding an episode
            out += self.report(key, self._finding(step, stats.epoch, {n: unheld[n] for n in new}, in_eval))
        tensors, numel = setup.foreign
        if tensors:
            message = (
                f"the optimizer(s) hold {tensors} parameter tensor(s) ({numel:,} elements) that are not the "
                "model's and get no gradient: built from another model instance, or before a module was "
                "replaced"
            )
            evidence = {"tensors": float(tensors), "elements": float(numel)}
            finding = self.finding(Severity.WARNING, step, stats.epoch, None, message, evidence)
            out += self.report("foreign", finding)
        else:
            out += self.resolve(
                "foreign", step, stats.epoch, None, "the optimizers hold the model's parameters"
            )
        return out

    def _finding(self, step: int, epoch: int, params: dict[str, tuple], in_eval: bool) -> Finding:
        layers = list(dict.fromkeys(v[0] for v in params.values()))
        numel = sum(v[1] for v in params.values())
        names = list(params)
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        message = (
            f"{len(names)} parameter tensor(s) ({numel:,} elements, in {len(layers)} layer(s)) get gradients "
            f"but no optimizer holds them: {shown}"
        )
        evidence = {"tensors": float(len(names)), "elements": float(numel)}
        if not in_eval:
            return self.finding(Severity.WARNING, step, epoch, layers[0], message, evidence)
        message += " (their modules are in eval mode: frozen by leaving them out of the optimizer?)"
        advice = (
            "These parameters are frozen by leaving them out of every optimizer, and their modules are in "
            "eval mode: if that is on purpose, set requires_grad_(False) on them, which skips computing "
            "their gradients; otherwise add them to the optimizer."
        )
        return self.finding(Severity.INFO, step, epoch, layers[0], message, evidence, advice)
