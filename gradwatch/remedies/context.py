"""What remedies may touch, handed over by the adapter: the model, optimizers, schedulers, scaler, a way to stop.

Also the shared pieces of state several remedies use: the learning-rate multiplier (:class:`LRControl`),
the ring of healthy snapshots in host memory (:class:`Snapshots`) and the best weights by validation loss
(:class:`BestWeights`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Context:
    """The training objects of one run, as remedies see them (Lightning-free).

    Attributes:
        model: the module being trained.
        optimizers: returns the current optimizers.
        schedulers: returns the current LR schedulers.
        scaler: the AMP GradScaler, if any.
        request_stop: asks the training loop to stop after the current step.
        automatic: False under manual optimization (the user steps optimizers and schedulers).
        reduce_any: True on every rank if it is True on any rank (identity in one process).
    """

    model: nn.Module
    optimizers: Callable[[], list[torch.optim.Optimizer]] = list
    schedulers: Callable[[], list[Any]] = list
    scaler: Any = None
    request_stop: Callable[[], None] = lambda: None
    automatic: bool = True
    reduce_any: Callable[[bool], bool] = bool


def _to_host(obj: Any) -> Any:
    """Deep copy of a state dict with every tensor on the CPU (a private copy, safe from in-place updates)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)  # sync: snapshots are taken rarely, on healthy reads
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return copy.deepcopy(obj)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nbytes(v) for v in obj)
    return 0


class LRControl:
    """A multiplier on every optimizer's learning rate that survives any LR scheduler.

    The scheduler always sees its own learning rate: :meth:`apply` multiplies each param group's ``lr``
    by the multiplier when a batch starts and :meth:`unapply` divides it back when the batch ends,
    before Lightning steps the schedulers. The optimizer steps with ``scheduler_lr * multiplier``;
    closed-form (LambdaLR, cosine), recursive (StepLR) and metric-driven (ReduceLROnPlateau)
    schedulers all keep their own arithmetic, and checkpoints hold the scheduler's view plus the
    multiplier (in the monitor's state).
    """

    def __init__(self) -> None:
        self.multiplier = 1.0
        self._applied: float | None = None

    @property
    def applied(self) -> bool:
        """Whether the optimizers' learning rates currently include the multiplier."""
        return self._applied is not None

    def apply(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if self._applied is not None or self.multiplier == 1.0:
            return
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] * self.multiplier
        self._applied = self.multiplier

    def unapply(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if self._applied is None:
            return
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["lr"] / self._applied
        self._applied = None

    def scale(self, factor: float, optimizers: list[torch.optim.Optimizer]) -> None:
        """Multiply the multiplier by ``factor``, effective at once (also mid-batch)."""
        was = self._applied
        self.unapply(optimizers)
        self.multiplier *= factor
        if was is not None:
            self.apply(optimizers)

    def state(self) -> dict[str, float]:
        return {"multiplier": self.multiplier}

    def load(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state.get("multiplier", 1.0))


@dataclass
class Snapshot:
    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    nbytes: int = 0


@dataclass
class Snapshots:
    """A ring of the last ``keep`` healthy states (model, optimizers, schedulers, scaler) in host memory."""

    keep: int = 2
    every_n_steps: int = 100
    ring: list[Snapshot] = field(default_factory=list)
    peak_bytes: int = 0

    def due(self, step: int) -> bool:
        return not self.ring or step - self.ring[-1].step >= self.every_n_steps

    def take(self, step: int, ctx: Context) -> Snapshot:
        snap = Snapshot(
            step=step,
            model=_to_host(ctx.model.state_dict()),
            optimizers=[_to_host(o.state_dict()) for o in ctx.optimizers()],
            schedulers=[_to_host(s.state_dict()) for s in ctx.schedulers()],
            scaler=_to_host(ctx.scaler.state_dict()) if ctx.scaler is not None else None,
        )
        snap.nbytes = _nbytes([snap.model, snap.optimizers])
        self.ring = [*self.ring[-(self.keep - 1) :], snap] if self.keep > 1 else [snap]
        self.peak_bytes = max(self.peak_bytes, sum(s.nbytes for s in self.ring))
        return snap

    def restore(self, ctx: Context) -> Snapshot | None:
        """Load the newest snapshot into the live objects; ``None`` if there is none."""
        if not self.ring:
            return None
        snap = self.ring[-1]
        ctx.model.load_state_dict(snap.model)
        for opt, state in zip(ctx.optimizers(), snap.optimizers, strict=False):
            opt.load_state_dict(copy.deepcopy(state))
        for sched, state in zip(ctx.schedulers(), snap.schedulers, strict=False):
            sched.load_state_dict(copy.deepcopy(state))
        if ctx.scaler is not None and snap.scaler is not None:
            ctx.scaler.load_state_dict(snap.scaler)
        return snap


class BestWeights:
    """The weights with the lowest validation loss so far, in host memory."""

    def __init__(self) -> None:
        self.loss = float("inf")
        self.step = -1
        self.state: dict[str, Any] | None = None

    def offer(self, step: int, val_loss: float, model: nn.Module) -> bool:
        if not val_loss < self.loss:
            return False
        self.loss, self.step, self.state = val_loss, step, _to_host(model.state_dict())
        return True

    def restore(self, model: nn.Module) -> bool:
        if self.state is None:
            return False
        model.load_state_dict(self.state)
        return True

    @property
    def nbytes(self) -> int:
        return _nbytes(self.state) if self.state else 0
