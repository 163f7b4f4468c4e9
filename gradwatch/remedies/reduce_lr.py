"""``reduce_lr``: lower the learning rate, in a way that survives LR schedulers and checkpoints."""

from __future__ import annotations

from typing import Any

from gradwatch.detectors.base import check_threshold
from gradwatch.findings import Action, Finding
from gradwatch.remedies.base import Remedy


def first_lr(ctx: Any) -> float:
    """The learning rate the first param group steps with: the scheduler's times gradwatch's multiplier
    (``ctx``: a :class:`~gradwatch.remedies.context.RemedyContext`)."""
    opts = ctx.context.optimizers() if ctx.context else []
    lr = opts[0].param_groups[0]["lr"] if opts and opts[0].param_groups else float("nan")
    return float(lr)  # sync: only if the LR is a tensor; read when acting, which is rare


class ReduceLR(Remedy):
    """Multiply every learning rate by ``factor`` (0.5; ``critical_factor``, 0.1, for a critical finding),
    with a cooldown and a floor.

    The change is a multiplier kept by gradwatch (:class:`~gradwatch.remedies.lr_control.LRControl`): the
    optimizer steps with ``scheduler_lr * multiplier`` while schedulers keep computing their own LR, so
    a LambdaLR, cosine, OneCycle or StepLR schedule goes on with its shape, only lower. The multiplier
    is in the monitor's checkpoint state. It never goes below ``min_multiplier`` (1e-3) of the
    schedule. Answers ``exploding_gradients``, ``divergence`` and ``update_ratio`` (too high). Works
    under manual optimization too: the multiplier rides on the schedulers' ``step``, whoever calls it.
    """

    name = "reduce_lr"
    answers = ("exploding_gradients", "divergence", "update_ratio")

    def __init__(
        self,
        factor: float = 0.5,
        critical_factor: float = 0.1,
        min_multiplier: float = 1e-3,
        cooldown_steps: int = 25,
        budget: int = 12,
    ) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.factor = check_threshold("ReduceLR", "factor", factor, example=0.5)
        self.critical_factor = check_threshold("ReduceLR", "critical_factor", critical_factor, example=0.1)
        if self.factor >= 1:
            from gradwatch.errors import ConfigError

            raise ConfigError(f"ReduceLR(factor=...) must be below 1, got {factor!r}. Write e.g. factor=0.5.")
        self.min_multiplier = check_threshold("ReduceLR", "min_multiplier", min_multiplier, example=1e-3)

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        if finding.rule == "update_ratio" and "layer_ratio" not in finding.evidence:
            return None  # a too-low update ratio wants a higher LR, not a lower one
        return self.lower(
            finding, ctx, self.critical_factor if finding.severity == "critical" else self.factor
        )

    def lower(self, finding: Finding, ctx: Any, factor: float) -> Action | None:
        lr = ctx.lr
        new = max(lr.multiplier * factor, self.min_multiplier)
        if new >= lr.multiplier:
            return None  # at the floor
        before = first_lr(ctx)
        old = lr.multiplier
        lr.scale(new / old)
        after = first_lr(ctx)
        message = f"lowered the learning rate {old / new:.3g}x (multiplier {old:.3g} -> {new:.3g}): {before:.4g} -> {after:.4g}"
        return self.action(
            finding, message, lr_before=before, lr_after=after, multiplier_before=old, multiplier_after=new
        )
