"""``skip_step``: skip an optimizer step whose gradients hold NaN or Inf."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from gradwatch.errors import ConfigError, check_positive_int, did_you_mean
from gradwatch.findings import Action, Finding
from gradwatch.internals import arm_found_inf, clear_found_inf, foreach_copy_
from gradwatch.remedies.base import Remedy

#: ``SkipStep(mode=...)``: how a step with non-finite gradients is kept from the weights.
MODES = ("deferred", "exact")


class SkipStep(Remedy):
    """Keep a step whose gradients hold a NaN or an Inf from corrupting the run, with no host sync per
    step by default.

    What each optimizer gets with the default ``mode="deferred"``:

    - **torch's Adam or AdamW with** ``fused=True`` (one optimizer, a single process, a model without
      buffers, no cooldown and budget to spare; ``SkipStep.on_device``): an **exact skip on the device**.
      The optimizer gets GradScaler's ``found_inf`` flag ("the total squared norm is not finite") and
      its fused kernel leaves weights, moments, step counts and weight decay untouched. The skip is
      counted and logged at the next read; after ``max_consecutive`` (3) in a row the run is rolled back.
    - **every other optimizer** (SGD with or without momentum, Adam, AdamW, foreach or for-loop, several
      optimizers, DDP): the step is taken, and the next read (every ``every_n_steps``) sees its gradient
      norms. Non-finite gradients that reached the weights are answered there by ``rollback`` to the
      newest snapshot taken before that step, with the learning rate unchanged (one bad batch says
      nothing about it). Snapshots are only taken after reads that saw no non-finite value, so the
      restored state is clean. While no rollback could undo a step (no snapshot yet: a run's first steps;
      rollback's budget spent or in its cooldown) the step is decided as with ``mode="exact"``. A resumed
      run keeps its restored state as a snapshot at its first batch.
      **The most progress lost** is the steps back to that snapshot: ``every_n_steps`` (20) plus the
      time between snapshots (every 20 steps at most by default; larger models snapshot less often,
      under a 1% time budget, but never more than 200 steps or 5% of the run apart; ``snapshot_every=N``
      sets it). A run that has let a non-finite step
      through is one that makes them: from then on its steps are decided as with ``mode="exact"``. Needs
      ``rollback`` among the remedies; without it, skip_step acts as ``mode="exact"``.

    ``mode="exact"``: the decision is made every step, before the optimizer steps, at the cost of one
    host read per step (on a GPU a sync: ~1.08x step time measured on a GPT-2-small step of ~30 ms), and
    under DDP one all-reduce per step so that every rank skips together. The gradients of the
    optimizer's parameters are set to ``None``; PyTorch's optimizers skip parameters without a gradient,
    so no weight, moment, step count or weight decay changes. ``optimizer.step()`` is still called, so
    LR schedulers stay in step. A NaN batch also poisons BatchNorm's running statistics in its forward
    pass, so in this mode the model's buffers are copied at the start of each step (on device, no sync)
    and put back when the step is skipped. After ``max_consecutive`` skipped steps in a row the guard
    (remedies/guard.py) escalates to ``rollback``. A finite gradient whose float32 squares overflow
    (a norm above ~1.8e19) is told apart from a non-finite one here, by its norm recomputed in float64;
    the device flag of a fused optimizer cannot tell them apart and skips such a step.

    Under an fp16 GradScaler the scaler already skips such steps (and calibrates its scale with them),
    so this remedy stands aside there; under bf16 nothing else would.
    """

    name = "skip_step"
    answers = ("nonfinite",)

    def __init__(
        self,
        max_consecutive: int = 3,
        cooldown_steps: int = 0,
        budget: int = 1_000_000,
        *,
        mode: str = "deferred",
    ) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.max_consecutive = check_positive_int("SkipStep(max_consecutive=...)", max_consecutive, 3)
        if mode not in MODES:
            raise ConfigError(
                f"SkipStep(mode=...) must be 'deferred' or 'exact', got {mode!r}.{did_you_mean(str(mode), MODES)}"
                ' Write SkipStep(mode="exact") to decide every step (one host read per step), or leave it out.'
            )
        self.mode = mode
        #: A deferred decision let a non-finite step through in this run: every step is decided from then.
        self.leaked = False
        self.consecutive = 0
        self._buffers: list[torch.Tensor] | None = None
        self._counted_step: int | None = None
        self._saved: list[torch.Tensor] = []
        #: optimizer -> handle of its step post-hook that disarms it (weak: an optimizer may be replaced)
        self._post_hooks: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def bind(self, model: torch.nn.Module) -> None:
        # a lazy module's buffers have no value until its first forward: kept from the first batch on
        self._buffers = [b for b in model.buffers() if not is_lazy(b)]
        self._saved = [b.detach().clone() for b in self._buffers]

    def on_device(self, optimizers: list[torch.optim.Optimizer], world_size: int, horizon: int) -> bool:
        """Whether this step's skip can be decided without a host read: see the class docstring.

        Only torch's own Adam and AdamW (not subclasses) with every group fused: their kernels take
        ``found_inf`` and undo the step count on it. (Fused SGD takes it too, but on a skipped first step
        leaves its momentum buffers uninitialised.) Not under ``torch.distributed``: ranks decide together
        on the host. Not with buffers, which a skipped step must put back. Not while a cooldown or a
        budget short of ``horizon`` (the most steps a read can lag) would make a skip wait or be refused.
        """
        if world_size != 1 or len(optimizers) != 1 or self._buffers:
            return False
        opt = optimizers[0]
        return (
            type(opt) in (torch.optim.Adam, torch.optim.AdamW)
            and all(group.get("fused") for group in opt.param_groups)
            and self.cooldown_steps == 0
            and self.budget - self.used >= horizon
        )

    def arm(self, optimizer: torch.optim.Optimizer, sq: torch.Tensor) -> None:
        """Hand the fused optimizer the device flag for this step: 1.0 (skip) when the total squared norm
        ``sq`` is not finite, as ``GradScaler.step`` hands it ``found_inf``. A step post-hook takes the
        flag away as soon as that step has run, so no later ``step()`` can use it."""
        arm_found_inf(optimizer, torch.isfinite(sq).logical_not().float())
        if optimizer not in self._post_hooks:
            self._post_hooks[optimizer] = optimizer.register_step_post_hook(
                lambda opt, args, kwargs: SkipStep.disarm(opt)
            )

    @property
    def hooked(self) -> int:
        """How many optimizers carry this remedy's disarming step post-hook (0 once a run ended)."""
        return len(self._post_hooks)

    def remove_hooks(self) -> None:
        """At the end of a run: the optimizers' disarming hooks go."""
        for handle in list(self._post_hooks.values()):
            handle.remove()
        self._post_hooks = weakref.WeakKeyDictionary()

    @staticmethod
    def disarm(optimizer: torch.optim.Optimizer) -> None:
        """After the optimizer stepped: gradwatch's flag is for that one step only. A flag GradScaler set
        (it arms fused optimizers the same way, and removes them itself) is not touched."""
        clear_found_inf(optimizer)

    def tally(self, step: int, skipped: bool) -> None:
        """Count a decided step towards ``max_consecutive`` (once per step, whatever the optimizers)."""
        if self._counted_step != step:
            self._counted_step = step
            self.consecutive = self.consecutive + 1 if skipped else 0

    def save_buffers(self) -> None:
        """At the start of a step: keep the buffers (BatchNorm running statistics) as they are."""
        if self._buffers:
            foreach_copy_(self._saved, self._buffers)

    def restore_buffers(self) -> None:
        """On a skipped step: undo what its forward pass did to the buffers."""
        if self._buffers:
            foreach_copy_(self._buffers, self._saved)

    def decide(self, step: int, sq: float, norms: list[float], reduce_any: Any) -> tuple[bool, float, int]:
        """Whether to skip, from the step's total squared gradient norm and its per-parameter norms (read
        to the host); returns ``(skip, grad_norm, nonfinite_params)``.

        With several optimizers in one step (manual optimization) each is decided on its own gradients,
        but the step counts once towards ``max_consecutive``.
        """
        skip = reduce_any(not math.isfinite(sq))
        self.tally(step, skip)
        if not skip:
            return False, math.sqrt(sq), 0
        bad = sum(not math.isfinite(v) for v in norms)
        return True, math.sqrt(sq) if sq >= 0 else math.nan, bad

    def skipped(self, step: int, epoch: int, grad_norm: float, nonfinite: int) -> Action:
        message = (
            f"skipped the optimizer step: {nonfinite} parameter(s) had non-finite gradients "
            f"(total norm {grad_norm:g}); weights and optimizer state left as they were"
        )
        detail = {
            "grad_norm_before": grad_norm,
            "nonfinite_params": nonfinite,
            "optimizer_step": "skipped",
            "consecutive": self.consecutive,
        }
        return self.record(Action(self.name, step, "nonfinite", detail, epoch, message))

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        return None  # acts per step (remedies/guard.py), before the finding is read

    def new_run(self) -> None:
        super().new_run()
        self.consecutive, self._counted_step, self.leaked = 0, None, False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "consecutive": self.consecutive, "leaked": self.leaked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.consecutive = state.get("consecutive", 0)
        self.leaked = bool(state.get("leaked", False))
