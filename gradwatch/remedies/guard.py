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

from gradwatch.distributed import is_dtensor, sharded_sq_norms
from gradwatch.findings import Action
from gradwatch.probes.gradients import exact_overflowed, host_squared_total, squared_total
from gradwatch.remedies.base import Remedy
from gradwatch.remedies.clip_gradients import ClipGradients
from gradwatch.remedies.context import Context
from gradwatch.remedies.responder import Responder
from gradwatch.remedies.rollback import Rollback
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
        #: skip_step decides at the read (SkipStep(mode="deferred"), the default): needs rollback to undo
        self._can_defer = (
            self.skip is not None and self.skip.mode == "deferred" and responder.rollback is not None
        )
        #: Actions taken per step since the last read (skips, escalations); filed at the next read.
        self.pending: list[Action] = []
        self.clipped_steps: set[int] = set()  # the steps clipped in the last read
        self.sharded = False  # set at bind
        self._leak: tuple[int, int, int] | None = None  # (first step, epoch, steps) not rolled back yet

    def deferred(self, step: int) -> bool:
        """Whether skip_step's decision on ``step`` can wait for the read (``SkipStep(mode="deferred")``,
        the default): only while a rollback could undo it (a snapshot in the ring, rollback's budget and
        cooldown allowing), and until a non-finite step got through; otherwise it is decided now. The
        ring and the budgets are the same on every rank, so every rank decides alike."""
        rollback = self.responder.rollback
        return (
            self._can_defer
            and not self.skip.leaked
            and bool(self.responder.ctx.snapshots.ring)
            and rollback.ready(step)
        )

    @property
    def active(self) -> bool:
        return self.skip is not None or self.clip is not None

    def bind(self, model: torch.nn.Module) -> None:
        if self.skip is not None:
            self.skip.bind(model)
        #: FSDP2 / DTensor parameters: each rank holds shards, so clipping needs the global norm
        self.sharded = any(is_dtensor(p) for p in model.parameters())

    def unbind(self, open_row: Any, optimizers: list[torch.optim.Optimizer]) -> None:
        """End of a run (or a failed step): no skip flag may stay armed, no hook attached."""
        if open_row is not None:
            self.step_done(open_row, optimizers)
        if self.skip is not None:
            self.skip.remove_hooks()
        self.pending, self._leak = [], None

    def batch_start(self) -> None:
        """The first batch of an optimizer step: keep the buffers an exact skip must put back (a deferred
        decision restores them with the rollback's snapshot)."""
        if self.skip is not None:  # cheap (buffers are small), and a decision may turn exact mid-window
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
        so large that its square overflows, which is no step to take either). A fused optimizer skips on
        that device flag (:meth:`SkipStep.on_device`); else, deferred (the default), the decision waits
        for the next read; exact, the norms are read to the host (the per-step read). ``row`` is the
        step's record (:class:`StepRow`).
        """
        opts = ctx.optimizers()
        if self.skip is not None and not scaled and self.skip.ready(row.step):  # a GradScaler skips itself
            if self.skip.on_device(opts, ctx.world_size, self.horizon):
                # no read: the fused optimizer skips on the device flag; counted at the next read
                sq = squared_total(norms)
                self.skip.arm(opts[0], sq)
                row.device_skip = True
                if self.clip is not None and grads:
                    row.clip = self._clip(grads, sq)
                return
            if self.deferred(row.step):
                row.deferred = True  # judged at the next read: rolled back there if it was not finite
            else:
                return self._decide(row, params, grads, norms, opts, ctx)
        # one running norm per run: with several optimizers their norms would mix, so clipping stands aside
        if self.clip is not None and grads and len(opts) == 1:
            row.clip = self._clip(grads, squared_total(norms))

    def _clip(self, grads: list[torch.Tensor], sq: torch.Tensor | float) -> torch.Tensor | float:
        """Clip on the step's squared norm; sharded, on the global one (the shards' squares summed across
        ranks, one all-reduce of a scalar with no host read): each rank's own shard norm would clip every
        rank by a different amount."""
        if self.sharded:
            sq = torch.as_tensor(sq, dtype=torch.float64, device=grads[0].device).reshape(1)
            sq = sharded_sq_norms(sq).reshape(())
        return self.clip.clip(grads, sq)

    def _decide(
        self,
        row: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        opts: list[torch.optim.Optimizer],
        ctx: Context,
    ) -> None:
        """``SkipStep(mode="exact")``: the decision now, on the norms read to the host; then clipping on
        that host number."""
        values = norms.tolist()  # sync: skip_step's decision, the one read per step
        if math.inf in values:  # a finite gradient whose float32 squares overflowed, or a real Inf
            values = exact_overflowed(norms, grads, values)
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
        if self.clip is not None and grads and len(opts) == 1:
            row.clip = self._clip(grads, sq)

    def step_done(self, row: Any, optimizers: list[torch.optim.Optimizer]) -> None:
        """After the optimizer step: a device flag was for that one step."""
        if row.device_skip and self.skip is not None:
            for opt in optimizers:
                self.skip.disarm(opt)

    def tally(self, rows: list[Any], stats: Any, escalate: bool, roll_back: bool = True) -> bool:
        """The decisions that waited for the read. Steps skipped on device (a fused optimizer's
        ``found_inf``): count them, log each skip, and escalate at each skipped step that reaches
        ``max_consecutive``, as the exact path does at that step (a rollback in its cooldown lets the
        skipping go on; a rollback resets the count). Deferred steps whose non-finite gradients were
        applied: roll back to the newest snapshot taken before the first of them. Not while a checkpoint
        is being written or the run ends (``escalate=False``): device skips are counted on. Leaks are
        rolled back at the run's end too; while a checkpoint is written (``roll_back=False``) they are
        kept for the next read. Returns whether a rollback restored a snapshot."""
        if self.skip is None:
            return False
        restored = False
        leaked = []  # deferred steps whose non-finite gradients were applied
        for r, rec in zip(rows, stats.steps, strict=True):
            # the flag was "the total squared norm is not finite": the same test as the read's row
            skipped = rec.grad_nonfinite > 0 or not math.isfinite(rec.grad_norm)
            if r.deferred and skipped:
                leaked.append(r)
            if not r.device_skip:
                continue
            # after a rollback in this read, the later rows were computed with the weights it replaced:
            # they say nothing about the restored state, so they neither count nor escalate
            if not restored:
                self.skip.tally(r.step, skipped)
            if skipped:
                self.skip.leaked = (
                    True  # decided exactly from now on (a float32 overflow is told apart there)
                )
                self.pending.append(self.skip.skipped(r.step, r.epoch, rec.grad_norm, rec.grad_nonfinite))
                if not restored and escalate and self.skip.consecutive >= self.skip.max_consecutive:
                    restored = self._escalate(r.step, r.epoch)
        if leaked and not restored:
            self.skip.leaked = True  # this run makes non-finite steps: from now on, decide every step
            if self._leak is None:
                self._leak = (leaked[0].step, leaked[0].epoch, len(leaked))
            else:
                self._leak = (*self._leak[:2], self._leak[2] + len(leaked))
        if self._leak is not None and roll_back and not restored:  # to the newest snapshot before it
            finding = Rollback.leaked(*self._leak)
            self._leak = None
            restored = self.responder.escalate(finding, self.pending.append, margin=1, keep_lr=True)
            if not restored:  # nothing could undo it (no snapshot, rollback spent): say so at least
                self.responder.publish([finding])
            self.skip.save_buffers()  # decided exactly from here: a skip must find the current buffers
        return restored

    def settle(
        self, rows: list[Any], stats: Any, clips: Any, escalate: bool, roll_back: bool = True
    ) -> tuple[bool, list[Action]]:
        """At a read: tally the skips decided on device (:meth:`tally`), then hand over the actions taken
        since the last read, the clipping of this read's steps last (one action for all of them).
        Returns ``(restored, actions)``; :attr:`clipped_steps` are the steps clipped in this read."""
        restored = self.tally(rows, stats, escalate, roll_back)
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
        finding = Rollback.escalation(step, epoch, self.skip.consecutive)
        restored = self.responder.escalate(finding, self.pending.append)
        if restored:
            self.skip.consecutive = 0
        return restored
