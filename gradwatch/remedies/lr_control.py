"""The learning-rate multiplier reduce_lr and rollback set, kept through any LR scheduler and checkpoints."""

from __future__ import annotations

from typing import Any

import torch


class LRControl:
    """A multiplier on every optimizer's learning rate that survives any LR scheduler.

    The optimizers' learning rates always include the multiplier (``applied``). Each LR scheduler's
    ``step`` is wrapped: the multiplier is divided out before the scheduler computes (so closed-form
    LambdaLR/cosine/OneCycle, recursive StepLR and metric-driven ReduceLROnPlateau all see and keep
    their own learning rate) and multiplied back in after. This works whoever steps the scheduler:
    Lightning (after the optimizer step, before ``on_train_batch_end``), or the user under manual
    optimization. Checkpoints hold optimizer learning rates with the multiplier in; the monitor's state
    holds the multiplier, so a resumed run continues exactly.
    """

    def __init__(self) -> None:
        self.multiplier = 1.0
        self.applied = 1.0  # what the optimizers' learning rates currently include
        self._optimizers: list[torch.optim.Optimizer] = []
        self._wrapped: list[tuple[Any, type]] = []
        self._loaded = False

    def attach(self, optimizers: list[torch.optim.Optimizer], schedulers: list[Any]) -> None:
        """Take charge of a run's optimizers and schedulers; apply the multiplier."""
        self.detach()
        if not self._loaded:
            self.applied = 1.0  # fresh optimizers: their learning rates are the schedulers' own
        self._loaded = False
        self._optimizers = list(optimizers)
        for sched in schedulers:
            # A subclass made on the fly, not an instance attribute: schedulers' state_dict() is their
            # __dict__, which checkpoints pickle. isinstance checks (ReduceLROnPlateau...) still hold.
            base = type(sched)
            sched.__class__ = type(
                base.__name__, (base,), {"step": self._stepper(base), "__module__": base.__module__}
            )
            self._wrapped.append((sched, base))
        self._set(self.multiplier)

    def _stepper(self, base: type) -> Any:
        """``base.step`` with the multiplier divided out while the scheduler computes."""

        def step(sched: Any, *args: Any, **kwargs: Any) -> Any:
            self._set(1.0)
            try:
                return base.step(sched, *args, **kwargs)
            finally:
                self._set(self.multiplier)

        return step

    def detach(self) -> None:
        """Give the schedulers their own class back (the learning rates keep the multiplier)."""
        for sched, base in self._wrapped:
            sched.__class__ = base
        self._wrapped = []

    def _set(self, target: float) -> None:
        if target == self.applied:
            return
        for opt in self._optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] / self.applied * target
        self.applied = target

    def scale(self, factor: float) -> None:
        """Multiply the multiplier by ``factor``, effective at once."""
        self.multiplier *= factor
        self._set(self.multiplier)

    def new_run(self) -> None:
        """A new fit (not a resume): its fresh optimizers start at the schedule's own learning rate."""
        self.multiplier, self._loaded = 1.0, False

    def state(self) -> dict[str, float]:
        return {"multiplier": self.multiplier, "applied": self.applied}

    def load(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state.get("multiplier", 1.0))
        self.applied = float(state.get("applied", self.multiplier))
        self._loaded = True  # the optimizers restored with this checkpoint include ``applied``
