"""What remedies may touch, handed over by the adapter: the model, optimizers, schedulers, scaler, a way to stop.

Also the shared pieces of state several remedies use: the learning-rate multiplier (:class:`LRControl`),
the ring of healthy snapshots in host memory (:class:`Snapshots`) and the best weights by validation loss
(:class:`BestWeights`).
"""

from __future__ import annotations

import copy
import time
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
    world_size: int = 1


def _to_host(obj: Any, reuse: Any = None) -> Any:
    """Deep copy of a state dict with every tensor on the CPU (a private copy, safe from in-place updates).

    ``reuse``: an older copy of the same structure whose host tensors may be overwritten (a snapshot the
    ring is about to drop). Copying into them instead of allocating saves the allocation and its page
    faults, most of a small model's snapshot time.
    """
    if isinstance(obj, torch.Tensor):
        src = obj.detach()
        if (
            isinstance(reuse, torch.Tensor)
            and reuse.shape == src.shape
            and reuse.dtype == src.dtype
            and reuse.device.type == "cpu"
        ):
            return reuse.copy_(src)  # sync (from a GPU): snapshots are taken rarely, on healthy reads
        return src.to("cpu", copy=True)
    if isinstance(obj, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: _to_host(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        old = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(_to_host(v, o) for v, o in zip(obj, old, strict=True))
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

    def restored(self, applied: float) -> None:
        """The optimizers were just loaded from a state whose learning rates include ``applied``."""
        self.applied = applied
        self._set(self.multiplier)

    def state(self) -> dict[str, float]:
        return {"multiplier": self.multiplier, "applied": self.applied}

    def load(self, state: dict[str, Any]) -> None:
        self.multiplier = float(state.get("multiplier", 1.0))
        self.applied = float(state.get("applied", self.multiplier))
        self._loaded = True  # the optimizers restored with this checkpoint include ``applied``


@dataclass
class Snapshot:
    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    nbytes: int = 0
    lr: float = float("nan")  # the learning rate the first param group stepped with at that time
    lr_applied: float = 1.0  # the gradwatch multiplier included in the optimizers' learning rates


@dataclass
class Snapshots:
    """A ring of the last ``keep`` healthy states (model, optimizers, schedulers, scaler) in host memory.

    At most one every ``every_n_steps`` steps, and (unless ``max_overhead`` is ``None``) never more often
    than keeps the time spent copying under ``max_overhead`` of the training time: a snapshot that took
    ``d`` seconds waits at least ``d / max_overhead`` seconds of training before the next, so large models
    snapshot less often.
    """

    keep: int = 2
    every_n_steps: int = 20
    max_overhead: float | None = 0.0025
    ring: list[Snapshot] = field(default_factory=list)
    peak_bytes: int = 0
    last_seconds: float = 0.0
    _last_time: float = 0.0

    def due(self, step: int, timed: bool = True) -> bool:
        """Whether a snapshot is due at ``step``. ``timed=False`` drops the time budget, which differs per
        rank: under DDP every rank must keep the same snapshots, so only the step count decides."""
        if not self.ring:
            return True
        if step - self.ring[-1].step < self.every_n_steps:
            return False
        if not timed or self.max_overhead is None:
            return True
        return (time.perf_counter() - self._last_time) * self.max_overhead >= self.last_seconds

    def take(self, step: int, ctx: Context, lr: float = float("nan"), lr_applied: float = 1.0) -> Snapshot:
        t0 = time.perf_counter()
        # the snapshot leaving the ring lends its host tensors to the new one; it leaves first, so that
        # a copy failing halfway never leaves a half-written snapshot in the ring
        old = self.ring.pop(0) if len(self.ring) >= self.keep else None
        old_opts = old.optimizers if old is not None else []
        snap = Snapshot(
            step=step,
            model=_to_host(ctx.model.state_dict(), old.model if old is not None else None),
            optimizers=[
                _to_host(o.state_dict(), old_opts[i] if i < len(old_opts) else None)
                for i, o in enumerate(ctx.optimizers())
            ],
            schedulers=[_to_host(s.state_dict()) for s in ctx.schedulers()],
            scaler=_to_host(ctx.scaler.state_dict()) if ctx.scaler is not None else None,
        )
        snap.nbytes = _nbytes([snap.model, snap.optimizers])
        snap.lr, snap.lr_applied = lr, lr_applied
        self.ring = [*self.ring[-(self.keep - 1) :], snap] if self.keep > 1 else [snap]
        self.peak_bytes = max(self.peak_bytes, sum(s.nbytes for s in self.ring))
        self._last_time = time.perf_counter()
        self.last_seconds = self._last_time - t0
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
