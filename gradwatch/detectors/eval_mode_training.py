"""``eval_mode_training``: the model trains with Dropout / BatchNorm in eval mode, or with BatchNorm
running statistics that never move."""

from __future__ import annotations

from gradwatch.detectors.base import Detector, check_count
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class EvalModeTraining(Detector):
    """Training steps run while Dropout or BatchNorm modules are in eval mode, or while a BatchNorm in
    training mode keeps running statistics that do not change.

    In eval mode dropout is off and BatchNorm normalizes with its running statistics instead of the
    batch's, and never updates them: the run trains a different network than the one it evaluates, with no
    NaN and no crash. The classic causes are a ``model.eval()`` left on before the training loop (after a
    validation in a plain loop, or a model loaded in eval mode; Lightning keeps the mode a model has when
    ``fit`` starts) and a submodule put in eval and never back.

    Statistic: at every read, each Dropout (p > 0), MultiheadAttention (dropout > 0) and norm layer with
    running statistics that is in eval mode, grouped by the module ``.eval()`` was called on (the highest
    module in eval mode above it). Fires at once (the mode is a fact, not an estimate). Frozen on purpose,
    and never reported: a module put in eval on its own while its parent trains (BatchNorm statistics
    frozen layer by layer, detection's ``norm_eval``), a norm layer whose own parameters are
    ``requires_grad=False`` or held by no optimizer (the "freeze BN" recipe), and an eval region none of
    whose parameters is trained (a frozen backbone in eval mode: ``requires_grad=False``, or left out of
    every optimizer). Norm layers with ``track_running_stats=False`` and dropout with p = 0 do the same in
    both modes and are not judged.

    Running statistics: for each norm layer in training mode, ``num_batches_tracked`` and
    ``||running_mean|| + ||running_var||`` ride along on the read's transfer; the rule fires when the norms
    are exactly unchanged over ``persist`` (2) consecutive reads spanning at least ``min_steps`` (20)
    optimizer steps (``momentum=0``, a layer the training forward never calls, buffers restored or passed
    as copies to ``torch.func.functional_call``).

    Severity: warning. Layer: the eval region (``""``: the whole model) or the norm layer. Evidence:
    modules (how many in the region), or steps and num_batches_tracked.
    """

    rule = "eval_mode_training"
    assumes = (
        "Training means training mode: every Dropout / BatchNorm that a trained parameter depends on is in "
        "training mode, and a norm layer in training mode updates its running statistics every batch. "
        "Modules frozen on purpose (alone in eval, or whose parameters nothing trains) are left out."
    )
    state_fields = ("seen", "still")
    advice = (
        "Dropout is off and BatchNorm uses (and never updates) its running statistics: the network trained "
        "is not the one evaluated. Call model.train() before the training loop (after each validation in a "
        "plain loop; Lightning keeps the mode the model had when fit started), and never leave a submodule "
        "in eval. If a part is frozen on purpose, set its parameters' requires_grad=False (or leave them out "
        "of the optimizer) and gradwatch leaves it alone. Running statistics that never move: check the "
        "layer's momentum (0 freezes them) and that the training forward calls the module itself."
    )

    def __init__(self, persist: int = 2, min_steps: int = 20) -> None:
        self.persist = check_count("EvalModeTraining", "persist", persist, example=2)
        self.min_steps = check_count("EvalModeTraining", "min_steps", min_steps, low=-1, example=20)
        self.seen: dict[str, list[float]] = {}  # norm layer -> [num_batches_tracked, norms] at the last read
        #: norm layer -> [reads, steps, num_batches_tracked at the start] its statistics have not moved
        self.still: dict[str, list[float]] = {}

    def check(self, step: int, stats: Stats) -> list[Finding]:
        setup = stats.model_setup
        if setup is None or not stats.steps:
            return []
        out: list[Finding] = []
        for key in [k for k in self.active if k.startswith("eval:") and k[5:] not in setup.eval_regions]:
            out += self.resolve(
                key, step, stats.epoch, key[5:] or None, f"{key[5:] or 'the model'} trains again"
            )
        for region, modules in setup.eval_regions.items():
            where = f"{region} is" if region else "the model is"
            shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
            message = (
                f"{where} in eval mode while it trains: {len(modules)} Dropout/BatchNorm module(s) act as at "
                f"inference ({shown})"
            )
            evidence = {"modules": float(len(modules))}
            finding = self.finding(Severity.WARNING, step, stats.epoch, region or None, message, evidence)
            out += self.report(f"eval:{region}", finding)
        out += self._running_stats(step, stats)
        return out

    def _running_stats(self, step: int, stats: Stats) -> list[Finding]:
        out: list[Finding] = []
        current = stats.model_setup.running_stats if stats.model_setup is not None else {}
        for name in [n for n in self.seen if n not in current]:  # in eval mode now: the flags judge it
            self.seen.pop(name)
            self.still.pop(name, None)
        for name, (count, norms) in current.items():
            before = self.seen.get(name)
            self.seen[name] = [count, norms]
            if before is None:
                continue
            if norms != before[1]:
                self.still.pop(name, None)
                out += self.resolve(
                    f"stats:{name}", step, stats.epoch, name, f"{name}'s statistics move again"
                )
                continue
            reads, steps, since = self.still.get(name, [0, 0, before[0]])
            reads, steps = reads + 1, steps + len(stats.steps)
            self.still[name] = [reads, steps, since]
            if reads < self.persist or steps < self.min_steps:
                continue
            ran = count - since
            why = (
                f"it normalized {ran:.0f} batch(es) meanwhile without updating them (momentum=0?)"
                if ran > 0
                else "num_batches_tracked did not move either: the training forward does not call the module "
                "(or its buffers are restored, or passed as copies)"
            )
            message = (
                f"{name}'s running statistics have not changed in {steps} training steps, in training mode: "
                f"{why}"
            )
            evidence = {"steps": float(steps), "num_batches_tracked": count}
            finding = self.finding(Severity.WARNING, step, stats.epoch, name, message, evidence)
            out += self.report(f"stats:{name}", finding)
        return out
