"""Healthy states for rollback and the best weights for early stopping, in host memory.

:class:`Snapshots` is the ring of healthy states; :class:`BestWeights` holds the weights with the lowest
validation loss. When a snapshot is taken is the policy's (gradwatch/remedies/snapshot_policy.py).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwatch import distributed
from gradwatch.remedies.context import Context

#: With the default ``snapshot_every=None``: the most of the training time rollback snapshots may take.
AUTO_SNAPSHOT_OVERHEAD = 0.01

#: With the default, the time budget never lets the newest snapshot grow older than this many steps or
#: :data:`MAX_GAP_FRACTION` of the steps so far, whichever is more: a rollback loses at most that much
#: progress (plus the finding's ``Rollback.margin``). A snapshot this forces costs at most its copy time
#: per gap, a share of the run that shrinks as the run grows.
MAX_SNAPSHOT_GAP = 200
MAX_GAP_FRACTION = 0.05


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


def _shared(ctx: Context) -> bool:
    """Every rank holds the same state (DDP, no sharded parameter): one copy, rank 0's, serves them all."""
    if not (ctx.replicated and ctx.world_size > 1):
        return False
    return not any(distributed.is_dtensor(p) for p in ctx.model.parameters())  # shards differ per rank


@dataclass
class Snapshot:
    step: int
    model: dict[str, Any]
    optimizers: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    nbytes: int = 0  # the size of the state it stands for (model and optimizers), held here or not
    lr: float = float("nan")  # the learning rate the first param group stepped with at that time
    #: the rules' state (by detector class name) right after the read that took it, for a rollback to
    #: rewind them with the weights; empty for a snapshot taken outside a read (at a resume)
    detectors: dict[str, Any] = field(default_factory=dict)
    #: this rank holds the copy; ``False``: a DDP rank other than 0, whose entry marks the step (rank 0's
    #: copy of it is broadcast at a rollback)
    held: bool = True


@dataclass
class Snapshots:
    """A ring of the last ``keep`` healthy states (model, optimizer state, scaler) in host memory.

    At most one every ``every_n_steps`` steps, and (unless ``max_overhead`` is ``None``) never more often
    than keeps the time spent copying under ``max_overhead`` of the training time: a snapshot that took
    ``d`` seconds waits at least ``d / max_overhead`` seconds of training before the next, so large models
    snapshot less often.

    Under DDP (``Context.replicated``: every rank holds the same weights and optimizer state) rank 0 alone
    keeps the copies; the other ranks' entries hold no tensors and mark the same steps, and a rollback
    broadcasts rank 0's copy to them. Sharded models (FSDP2 / ``DTensor``) keep a copy of each rank's own
    shards on every rank. Every rank keeps its own scaler state (a few numbers). ``peak_bytes`` is what
    this rank holds.
    """

    keep: int = 2
    every_n_steps: int = 20
    max_overhead: float | None = 0.01
    max_gap: int | None = None  # a snapshot this many steps old is replaced whatever the time budget
    ring: list[Snapshot] = field(default_factory=list)
    peak_bytes: int = 0
    last_seconds: float = 0.0
    _last_time: float = 0.0

    @classmethod
    def every(cls, snapshot_every: int | None, keep: int = 2) -> Snapshots:
        """``snapshot_every=N``: every N steps at most; ``None``: every 20 at most, copying at most
        :data:`AUTO_SNAPSHOT_OVERHEAD` of the training time, and at least every :data:`MAX_SNAPSHOT_GAP`
        steps or :data:`MAX_GAP_FRACTION` of the run so far, whichever is more."""
        if snapshot_every is None:
            return cls(
                keep=keep, every_n_steps=20, max_overhead=AUTO_SNAPSHOT_OVERHEAD, max_gap=MAX_SNAPSHOT_GAP
            )
        return cls(keep=keep, every_n_steps=snapshot_every, max_overhead=None)

    def due_by_steps(self, step: int) -> bool | None:
        """Whether a snapshot is due at ``step`` by the step counts alone (the same on every rank), or
        ``None``: the time budget decides (:meth:`within_budget`, which differs per rank)."""
        if not self.ring:
            return True
        gap = step - self.ring[-1].step
        if gap < self.every_n_steps:
            return False
        if self.max_overhead is None:
            return True
        if self.max_gap is not None and gap >= max(self.max_gap, MAX_GAP_FRACTION * step):
            return True  # bound the progress a rollback can lose
        return None

    def within_budget(self) -> bool:
        """The time since the last snapshot lets the next one keep copying under ``max_overhead``."""
        if self.max_overhead is None:
            return True
        return (time.perf_counter() - self._last_time) * self.max_overhead >= self.last_seconds

    def due(self, step: int, timed: bool = True) -> bool:
        """Whether a snapshot is due at ``step`` on this rank. ``timed=False`` drops the time budget."""
        by_steps = self.due_by_steps(step)
        return by_steps if by_steps is not None else not timed or self.within_budget()

    @staticmethod
    def holds(ctx: Context) -> bool:
        """Whether this rank keeps the copies: not on a DDP rank other than 0 (rank 0's copy serves all)."""
        return not _shared(ctx) or distributed.rank() == 0

    def take(self, step: int, ctx: Context, lr: float = float("nan")) -> Snapshot:
        t0 = time.perf_counter()
        # the snapshot leaving the ring lends its host tensors to the new one; it leaves first, so that
        # a copy failing halfway never leaves a half-written snapshot in the ring
        old = self.ring.pop(0) if len(self.ring) >= self.keep else None
        old = old if old is not None and old.held else None
        scaler = _to_host(ctx.scaler.state_dict()) if ctx.scaler is not None else None
        if self.holds(ctx):
            old_opts = old.optimizers if old is not None else []
            snap = Snapshot(
                step=step,
                model=_to_host(ctx.model.state_dict(), old.model if old is not None else None),
                optimizers=[
                    _to_host(o.state_dict(), old_opts[i] if i < len(old_opts) else None)
                    for i, o in enumerate(ctx.optimizers())
                ],
                scaler=scaler,
            )
            snap.nbytes = _nbytes([snap.model, snap.optimizers])
        else:  # the size rank 0's copy has (the same state): actions say the same on every rank
            live = [ctx.model.state_dict(), [o.state_dict() for o in ctx.optimizers()]]
            snap = Snapshot(
                step=step, model={}, optimizers=[], scaler=scaler, nbytes=_nbytes(live), held=False
            )
        snap.lr = lr
        self.ring = [*self.ring[-(self.keep - 1) :], snap] if self.keep > 1 else [snap]
        self.peak_bytes = max(self.peak_bytes, sum(s.nbytes for s in self.ring if s.held))
        self._last_time = time.perf_counter()
        self.last_seconds = self._last_time - t0
        return snap

    def restore(self, ctx: Context) -> Snapshot | None:
        """Load the newest snapshot into the live model, optimizer state and scaler; ``None`` if there is
        none (or, on a DDP rank other than 0 reading alone, no copy to load). Under DDP every rank calls
        it at the same read: rank 0 broadcasts its copy, and every rank loads the same state. The
        optimizers keep their live hyperparameters (learning rate, momentum, ...) and the LR schedulers
        are not rewound: the schedule follows the optimizer steps the run has taken (a cosine or OneCycle
        schedule still ends at its last step), and a learning rate the user changed by hand since the
        snapshot stays changed."""
        if not self.ring:
            return None
        snap = self.ring[-1]
        model, optimizers = snap.model, snap.optimizers
        if _shared(ctx) and distributed.together():  # rank 0's copy, on every rank
            first = next(ctx.model.parameters(), None)
            nccl = first is not None and first.is_cuda and dist.get_backend() == "nccl"
            device = first.device if nccl else torch.device("cpu")
            model, optimizers = distributed.broadcast_state((model, optimizers), device)
        elif not snap.held:
            return None  # a rank reading alone (a failing run's end) without the copy
        ctx.model.load_state_dict(model)
        for opt, state in zip(ctx.optimizers(), optimizers, strict=False):
            live = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            opt.load_state_dict(copy.deepcopy(state) if snap.held else state)
            for group, hyper in zip(opt.param_groups, live, strict=False):
                group.update(hyper)
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
