"""``skip_step``: skip an optimizer step whose gradients hold NaN or Inf."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.errors import check_positive_int
from gradwatch.findings import Action, Finding
from gradwatch.remedies.base import Remedy


class SkipStep(Remedy):
    """Skip the optimizer step entirely when any gradient is non-finite.

    Decided every step, before the optimizer steps: this is the one host sync gradwatch adds per step
    when it is on (the decision cannot wait), reduced across ranks so that every rank skips together.
    The gradients of the optimizer's parameters are set to ``None``; PyTorch's optimizers skip
    parameters without a gradient, so no weight, moment, step count or weight decay changes, and nothing
    leaks into the next accumulation window. ``optimizer.step()`` itself is still called, so LR
    schedulers stay in step. Under an fp16 GradScaler the scaler already skips such steps (and
    calibrates its scale with them), so this remedy stands aside there; under bf16 nothing else would.

    A NaN batch also poisons BatchNorm's running statistics in its forward pass, before any gradient
    exists; so at the start of each step the model's buffers are copied on device
    (``torch._foreach_copy_``, no host sync; buffers are small) and put back when the step is skipped.

    After ``max_consecutive`` (3) skipped steps in a row the run is not recovering by skipping: the
    monitor escalates to ``rollback`` when it is enabled.
    """

    name = "skip_step"
    answers = ("nonfinite",)

    def __init__(self, max_consecutive: int = 3, cooldown_steps: int = 0, budget: int = 1_000_000) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.max_consecutive = check_positive_int("SkipStep(max_consecutive=...)", max_consecutive, 3)
        self.consecutive = 0
        self._buffers: list[torch.Tensor] | None = None
        self._counted_step: int | None = None
        self._saved: list[torch.Tensor] = []

    def bind(self, model: torch.nn.Module) -> None:
        self._buffers = list(model.buffers())
        self._saved = [b.detach().clone() for b in self._buffers]

    def save_buffers(self) -> None:
        """At the start of a step: keep the buffers (BatchNorm running statistics) as they are."""
        if self._buffers:
            torch._foreach_copy_(self._saved, self._buffers)

    def restore_buffers(self) -> None:
        """On a skipped step: undo what its forward pass did to the buffers."""
        if self._buffers:
            torch._foreach_copy_(self._buffers, self._saved)

    def decide(self, step: int, sq: float, norms: torch.Tensor, reduce_any: Any) -> tuple[bool, float, int]:
        """Whether to skip, from the step's total squared gradient norm (already read to the host);
        returns ``(skip, grad_norm, nonfinite_params)``.

        With several optimizers in one step (manual optimization) each is decided on its own gradients,
        but the step counts once towards ``max_consecutive``.
        """
        skip = reduce_any(not math.isfinite(sq))
        if self._counted_step != step:
            self._counted_step = step
            self.consecutive = self.consecutive + 1 if skip else 0
        if not skip:
            return False, math.sqrt(sq), 0
        bad = int((~torch.isfinite(norms)).sum())  # sync: only on a skipped step, for its report
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

    def respond(self, finding: Finding, monitor: Any) -> Action | None:
        return None  # acts per step, in the gradient hook, before the finding is read

    def new_run(self) -> None:
        super().new_run()
        self.consecutive, self._counted_step = 0, None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.consecutive = state.get("consecutive", 0)
