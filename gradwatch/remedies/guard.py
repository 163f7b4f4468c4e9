"""Per-step protection: skip a non-finite optimizer step, clip adaptively, escalate repeated skips.

The two remedies that act on every optimizer step, before it is taken (``skip_step``, ``clip_gradients``),
run here, in :meth:`StepGuard.repair`; the actions they take are kept in :attr:`StepGuard.pending` and
filed at the next read. When skip_step has skipped ``max_consecutive`` steps in a row, the guard asks the
:class:`~gradwatch.remedies.responder.Responder` to escalate (roll back, or give up).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.findings import Action
from gradwatch.probes.gradients import host_squared_total, squared_total
from gradwatch.remedies.base import Remedy
from gradwatch.remedies.clip_gradients import ClipGradients
from gradwatch.remedies.context import Context
from gradwatch.remedies.responder import Responder
from gradwatch.remedies.skip_step import SkipStep


class StepGuard:
    """The per-step remedies of a run, or none.

    Args:
        remedies: the run's remedies; the guard takes ``skip_step`` and ``clip_gradients`` from them.
        responder: escalates repeated skips.
        horizon: the most steps a read can lag (skip_step decides on device only with that much budget).
    """

    def __init__(self, remedies: list[Remedy], responder: Responder, horizon: int) -> None:
        self.skip: SkipStep | None = next((r for r in remedies if isinstance(r, SkipStep)), None)
        self.clip: ClipGradients | None = next((r for r in remedies if isinstance(r, ClipGradients)), None)
        self.responder = responder
        self.horizon = horizon
        #: Actions taken per step since the last read (skips, escalations); filed at the next read.
        self.pending: list[Action] = []
        self.clipped_steps: set[int] = set()  # the steps clipped in the last read

    @property
    def active(self) -> bool:
        return self.skip is not None or self.clip is not None

    def bind(self, model: torch.nn.Module) -> None:
        if self.skip is not None:
            self.skip.bind(model)

    def unbind(self, open_row: Any, optimizers: list[torch.optim.Optimizer]) -> None:
        """End of a run (or a failed step): no skip flag may stay armed, no hook attached."""
        if open_row is not None:
            self.step_done(open_row, optimizers)
        if self.skip is not None:
            self.skip.remove_hooks()
        self.pending = []

    def batch_start(self) -> None:
        """The first batch of an optimizer step: keep the buffers a skipped step must put back."""
        if self.skip is not None:
            self.skip.save_buffers()

    def repair(
        self,
        row: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        scaled: bool,
        ctx: Context,
    ) -> None:
        """Before the optimizer steps: skip the step if a gradient is non-finite, else clip adaptively.

        The sum of squares of the norms is non-finite exactly when a gradient holds a NaN or an Inf (or is
        so large that its square overflows, which is no step to take either). With ``skip_step`` on, that
        one number is read to the host (the per-step read), unless a fused optimizer can skip on the
        device flag (:meth:`SkipStep.on_device`). ``row`` is the step's record (:class:`StepRow`).
        """
        opts = ctx.optimizers()
        sq: torch.Tensor | float | None = None  # a host float once skip_step's decision has read it
        if self.skip is not None and not scaled and self.skip.ready(row.step):  # a GradScaler skips itself
            if self.skip.on_device(opts, ctx.world_size, self.horizon):
                # no read: the fused optimizer skips on the device flag; counted at the next read
                sq = squared_total(norms)
                self.skip.arm(opts[0], sq)
                row.device_skip = True
                if self.clip is not None and grads:
                    row.clip = self.clip.clip(grads, sq)
                return
            values = norms.tolist()  # sync: skip_step's decision, the one read per step
            sq = host_squared_total(values)
            skip, norm, bad = self.skip.decide(row.step, sq, values, ctx.reduce_any)
            if skip:
                for p in params:
                    p.grad = None  # torch optimizers leave parameters without a gradient untouched
                self.skip.restore_buffers()
                self.pending.append(self.skip.skipped(row.step, row.epoch, norm, bad))
                if self.skip.consecutive >= self.skip.max_consecutive:
                    self._escalate(row.step, row.epoch)
                return
        # one running norm per run: with several optimizers their norms would mix, so clipping stands aside
        if self.clip is not None and grads and len(opts) == 1:
            row.clip = self.clip.clip(grads, sq if sq is not None else squared_total(norms))

    def step_done(self, row: Any, optimizers: list[torch.optim.Optimizer]) -> None:
        """After the optimizer step: a device flag was for that one step."""
        if row.device_skip and self.skip is not None:
            for opt in optimizers:
                self.skip.disarm(opt)

    def tally(self, rows: list[Any], stats: Any, escalate: bool) -> bool:
        """Steps whose skip was decided on device (a fused optimizer's ``found_inf``): now that their norms
        are on the host, count them, log each skip, and escalate at each skipped step that reaches
        ``max_consecutive``, as the per-step path does at that step (a rollback in its cooldown lets the
        skipping go on; a rollback resets the count). Not while a checkpoint is being written or the run
        ends (``escalate=False``): the count is kept, and a skip at the next read escalates. Returns
        whether a rollback restored a snapshot."""
        if self.skip is None:
            return False
        restored = False
        for r, rec in zip(rows, stats.steps, strict=True):
            if not r.device_skip:
                continue
            # the flag was "the total squared norm is not finite": the same test as the read's row
            skipped = rec.grad_nonfinite > 0 or not math.isfinite(rec.grad_norm)
            # after a rollback in this read, the later rows were computed with the weights it replaced:
            # they say nothing about the restored state, so they neither count nor escalate
            if not restored:
                self.skip.tally(r.step, skipped)
            if skipped:
                self.pending.append(self.skip.skipped(r.step, r.epoch, rec.grad_norm, rec.grad_nonfinite))
                if not restored and escalate and self.skip.consecutive >= self.skip.max_consecutive:
                    restored = self._escalate(r.step, r.epoch)
        return restored

    def settle(self, rows: list[Any], stats: Any, clips: Any, escalate: bool) -> tuple[bool, list[Action]]:
        """At a read: tally the skips decided on device (:meth:`tally`), then hand over the actions taken
        since the last read, the clipping of this read's steps last (one action for all of them).
        Returns ``(restored, actions)``; :attr:`clipped_steps` are the steps clipped in this read."""
        restored = self.tally(rows, stats, escalate)
        clipped = []
        if clips is not None and self.clip is not None:
            clipped = [
                (r.step, r.epoch, rec.grad_norm, float(c))
                for r, rec, c in zip(rows, stats.steps, clips, strict=True)
                if c < 1.0
            ]
        self.clipped_steps = {c[0] for c in clipped}
        actions, self.pending = self.pending, []
        action = self.clip.clipped(clipped) if clipped else None
        return restored, actions + ([action] if action is not None else [])

    def _escalate(self, step: int, epoch: int) -> bool:
        restored = self.responder.escalate(step, epoch, self.skip.consecutive, self.pending.append)
        if restored:
            self.skip.consecutive = 0
        return restored
