"""What remedies may touch: :class:`Context` (the training objects the adapter hands over) and
:class:`RemedyContext` (those, plus the state remedies share), the one object a remedy is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from gradwatch.remedies.lr_control import LRControl
    from gradwatch.remedies.snapshots import BestWeights, Snapshots


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
        world_size: the number of ranks.
        replicated: every rank holds the same weights and optimizer state (DDP): rank 0 alone keeps the
            rollback snapshots, and a rollback broadcasts its restored state to the other ranks.
    """

    model: nn.Module
    optimizers: Callable[[], list[torch.optim.Optimizer]] = list
    schedulers: Callable[[], list[Any]] = list
    scaler: Any = None
    request_stop: Callable[[], None] = lambda: None
    automatic: bool = True
    reduce_any: Callable[[bool], bool] = bool
    world_size: int = 1
    replicated: bool = False


def _no_activity(module: str | None) -> torch.Tensor | None:
    return None


@dataclass
class RemedyContext:
    """Everything a remedy may touch, and nothing more: what ``Remedy.respond`` is given.

    Attributes:
        context: the run's training objects (``None`` before a fit binds, or when only observing).
        lr: the learning-rate multiplier (:class:`~gradwatch.remedies.lr_control.LRControl`).
        snapshots: the ring of healthy states for rollback.
        best: the weights with the best validation loss so far, for early stopping.
        activity: per-unit activity of a module at the last sampled step (a device vector), or ``None``.
        skipping: skip_step answers non-finite gradients every step (so rollback waits for it to escalate).
    """

    lr: LRControl
    snapshots: Snapshots
    best: BestWeights
    context: Context | None = None
    activity: Callable[[str | None], torch.Tensor | None] = field(default=_no_activity)
    skipping: bool = False

    def unit_activity(self, module: str | None) -> torch.Tensor | None:
        return self.activity(module)


def __getattr__(name: str) -> Any:
    """``LRControl``, ``Snapshots``, ``BestWeights`` and ``Snapshot`` lived here before their own modules."""
    if name == "LRControl":
        from gradwatch.remedies.lr_control import LRControl

        return LRControl
    if name in ("Snapshots", "Snapshot", "BestWeights"):
        from gradwatch.remedies import snapshots

        return getattr(snapshots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
