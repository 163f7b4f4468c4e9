"""Leftover-gradient probe: does ``.grad`` still hold the last step's gradient when this step's arrives?

A loop that never calls ``optimizer.zero_grad()`` steps with the sum of every gradient since the start:
momentum with a coefficient of 1, which blows up within tens of steps. On a scheduled step, a tensor hook
on a few parameters the optimizer steps (:data:`WATCHED`, the smallest: biases, typically) looks at
``param.grad`` each time a gradient for it arrives, before autograd adds the new one in. If the gradient
was cleared since the last optimizer step (``zero_grad`` sets it to ``None``, or to zeros), some arrival
finds it ``None`` or all zeros; gradients accumulated on purpose over micro-batches of one step
(Lightning's ``accumulate_grad_batches``, a plain loop that calls ``backward`` k times per
``optimizer.step``) start from a cleared gradient too. Only when every gradient added in during the step
found a nonzero one already there is the parameter's gradient left over from earlier optimizer steps. A
second hook (``register_post_accumulate_grad_hook``) confirms each arrival was added in: gradients that
``torch.autograd.grad`` returns (a loop that assigns ``p.grad = g`` itself, overwriting) add nothing, and
are not judged.

The window is the scheduled step's first batch (from its ``batch_start`` to its batch end: every backward
of a plain loop's step, and a Trainer's first micro-batch, whose backward follows Lightning's
``zero_grad``). Cost: four hooks registered and removed once per scheduled step; per arrival a ``!= 0``
test of a watched gradient, and at the first two norms: device ops on two small tensors, no host read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from gradwatch.distributed import is_dtensor
from gradwatch.stats import LeftoverStats

#: How many parameters are watched: the smallest the optimizer steps (their gradients are cheap to test).
WATCHED = 2
#: The row per scheduled step: watched, fired (got a gradient), stale (every arrival found a gradient
#: left over), the left-over and the new gradients' squared norms at the first arrival (summed).
FIELDS = 5
#: What an arriving gradient found when ``.grad`` was ``None`` (cleared).
CLEARED = "cleared"


class LeftoverProbe:
    """The watched parameters (chosen at the first measured step) and the hooks of one window."""

    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self._handles: list[Any] = []
        self._stale: list[torch.Tensor | None] = []  # per watched parameter: all arrivals so far stale
        self._sq: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # (held, new) at the first arrival
        self._cleared: list[bool] = []
        self._pending: list[Any] = []  # per watched parameter: what the arriving gradient found, until added

    def choose(self, params: list[torch.Tensor]) -> None:
        """Pick the watched parameters, once: the :data:`WATCHED` smallest with a dense gradient now."""
        if self.params:
            return
        dense = [
            p
            for p in params
            if p.grad is not None and p.grad.layout == torch.strided and not is_dtensor(p) and p.requires_grad
        ]
        self.params = sorted(dense, key=lambda p: p.numel())[:WATCHED]

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self) -> None:
        """Open a window: hook the watched parameters (before and after autograd adds a gradient in)."""
        self.disarm()
        n = len(self.params)
        self._stale, self._sq, self._cleared, self._pending = [None] * n, [None] * n, [False] * n, [None] * n
        for i, p in enumerate(self.params):
            self._handles.append(p.register_hook(self._arriving(i, p)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._added(i)))

    def _arriving(self, i: int, param: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def seen(grad: torch.Tensor) -> None:  # before autograd adds ``grad`` into ``param.grad``
            if self._cleared[i]:
                return
            held = param.grad
            if held is None or held.layout != torch.strided or grad.layout != torch.strided:
                self._pending[i] = CLEARED  # (a sparse gradient is not judged)
                return
            norms = None
            if self._stale[i] is None:  # the first gradient added in: its norms for the message
                norms = (
                    torch.linalg.vector_norm(held.detach()).double().square(),
                    torch.linalg.vector_norm(grad.detach()).double().square(),
                )
            self._pending[i] = ((held != 0).any(), norms)

        return seen

    def _added(self, i: int) -> Callable[[torch.Tensor], None]:
        def added(param: torch.Tensor) -> None:  # it was added in: a backward (torch.autograd.grad adds none)
            pending, self._pending[i] = self._pending[i], None
            if pending is None or self._cleared[i]:
                return
            if pending is CLEARED:
                self._cleared[i] = True
                return
            nonzero, norms = pending
            if self._stale[i] is None:
                self._stale[i], self._sq[i] = nonzero, norms
            else:
                self._stale[i] = self._stale[i] & nonzero

        return added

    def take(self, device: torch.device) -> torch.Tensor:
        """Close the window: ``[watched, fired, stale, held_sq, new_sq]`` on ``device`` (zeros where it
        was never opened), and the hooks off."""
        row = torch.zeros(FIELDS, dtype=torch.float64, device=device)
        if not self.armed:
            return row
        self.disarm()
        parts = [row[0] + len(self.params)]
        fired = [i for i, s in enumerate(self._stale) if s is not None or self._cleared[i]]
        stale = [s for i, s in enumerate(self._stale) if s is not None and not self._cleared[i]]
        parts.append(row[1] + len(fired))
        parts.append(torch.stack(stale).double().sum().to(device) if stale else row[2])
        sq = [pair for i, pair in enumerate(self._sq) if pair is not None and not self._cleared[i]]
        parts.append(torch.stack([h for h, _ in sq]).sum().to(device) if sq else row[3])
        parts.append(torch.stack([n for _, n in sq]).sum().to(device) if sq else row[4])
        return torch.stack(parts)

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def forget(self) -> None:
        """Hooks off and no parameter watched (a new bind)."""
        self.disarm()
        self.params = []


def settle(row: np.ndarray | None) -> LeftoverStats | None:
    """The read's leftover row as :class:`LeftoverStats` (``None``: no window was opened).

    Example:
        >>> settle(np.array([2.0, 2.0, 2.0, 9.0, 16.0]))
        LeftoverStats(watched=2, fired=2, stale=2, held_norm=3.0, new_norm=4.0)
    """
    if row is None or not row[0] > 0:
        return None
    watched, fired, stale, held_sq, new_sq = row.tolist()  # sync: none, a NumPy array already on the host
    return LeftoverStats(round(watched), round(fired), round(stale), math.sqrt(held_sq), math.sqrt(new_sq))
