"""``clip_gradients``: adaptive, sync-free gradient clipping (ZClip's z-score rule)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.detectors.base import check_threshold
from gradwatch.findings import Action, Finding
from gradwatch.internals import foreach_mul_
from gradwatch.remedies.base import Remedy

#: Clipping that scales gradients by at least this factor is routine (not an incident).
ROUTINE_FACTOR = 0.5


class ClipGradients(Remedy):
    """Clip the total gradient norm at ``mean + z * std`` of its running statistics.

    ZClip's rule (Kumar et al., 2025): an EMA (alpha 0.97) of the total norm and of its variance; after
    ``warmup_steps`` (25) the gradients are multiplied by ``min(1, threshold / norm)`` — a clamped
    coefficient computed on device, so clipping needs no host sync — and the EMA is fed the clipped
    norm, so a spike does not raise the threshold for the next one. Runs every step after gradwatch
    has measured the (unclipped) norm and before Lightning's own ``gradient_clip_val``.

    Each read logs one action listing the steps clipped in it, with the largest pre-clip norm and the
    smallest factor; when no step was scaled below ``0.5`` the action is marked ``routine`` (logged at
    INFO, not sent as an alert).
    """

    name = "clip_gradients"
    answers = ("gradient_spike",)

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup_steps: int = 25, **kw: Any) -> None:
        super().__init__(**kw)
        self.z = check_threshold("ClipGradients", "z", z, example=2.5)
        self.alpha = check_threshold("ClipGradients", "alpha", alpha, example=0.97)
        self.warmup_steps = int(
            check_threshold("ClipGradients", "warmup_steps", warmup_steps, low=-1, example=25)
        )
        self.n = 0
        self._mean: torch.Tensor | None = None  # running statistics, on device
        self._var: torch.Tensor | None = None
        self._count: torch.Tensor | None = None  # finite steps seen

    def clip(self, grads: list[torch.Tensor], sq_total: torch.Tensor) -> torch.Tensor:
        """Scale ``grads`` in place; returns the coefficient applied (1 when not clipped), on device.

        Device ops only, no host read, every step. A non-finite step neither starts, moves nor counts
        towards the warm-up (the count of finite steps is a device tensor); :attr:`n` counts calls.
        """
        norm = sq_total.detach().double().sqrt()  # the running statistics in float64, like Python floats
        finite = torch.isfinite(norm)
        if self._mean is None or self._var is None or self._count is None:  # NaN until a finite norm
            self._mean, self._var = torch.full_like(norm, math.nan), torch.zeros_like(norm)
            self._count = torch.zeros_like(norm)
        elif self._mean.device != norm.device or self._mean.dtype != norm.dtype:  # loaded from a checkpoint
            self._mean, self._var, self._count = (t.to(norm) for t in (self._mean, self._var, self._count))
        a = self.alpha
        started = torch.isfinite(self._mean)
        coef = torch.ones_like(norm)
        seen = norm
        self.n += 1
        if self.n > self.warmup_steps:  # calls bound finite steps: before this, no step can clip
            warm = started & (self._count >= self.warmup_steps)
            threshold = self._mean + self.z * self._var.sqrt()
            coef = torch.where(warm & finite & (norm > threshold), threshold / (norm + 1e-12), coef)
            foreach_mul_(grads, coef)
            seen = torch.where(warm, torch.minimum(norm, threshold), norm)
        d = seen - self._mean
        mean = torch.where(started, self._mean + (1 - a) * d, norm)
        var = torch.where(started, a * (self._var + (1 - a) * d * d), torch.zeros_like(norm))
        self._mean = torch.where(finite, mean, self._mean)
        self._var = torch.where(finite, var, self._var)
        self._count = self._count + finite.float()
        return coef

    def clipped(self, steps: list[tuple[int, int, float, float]]) -> Action | None:
        """One action for the ``(step, epoch, pre_clip_norm, factor)`` of the steps clipped in a read."""
        if not steps:
            return None
        first_step, epoch = steps[0][0], steps[0][1]
        worst = min(steps, key=lambda s: s[3])
        detail = {
            "steps": [s[0] for s in steps],
            "pre_clip_norm": worst[2],
            "factor": worst[3],
            "post_clip_norm": worst[2] * worst[3],
            # a trim of less than 2x is everyday adaptive clipping: logged at INFO, not alerted
            "routine": worst[3] >= ROUTINE_FACTOR,
        }
        message = (
            f"clipped {len(steps)} step(s) to mean + {self.z:g} std of the running norm; largest: norm "
            f"{worst[2]:.4g} scaled by {worst[3]:.3g} at step {worst[0]}"
        )
        return self.record(Action(self.name, first_step, "gradient_spike", detail, epoch, message))

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        return None  # clips every step, on device; actions are logged per read

    def state_dict(self) -> dict[str, Any]:
        mean = float(self._mean) if self._mean is not None else math.nan  # sync: checkpoint only
        var = float(self._var) if self._var is not None else math.nan  # sync: checkpoint only
        n = int(float(self._count)) if self._count is not None else self.n  # sync: checkpoint only
        return {**super().state_dict(), "n": n, "mean": mean, "var": var}

    def new_run(self) -> None:
        super().new_run()
        self.n, self._mean, self._var, self._count = 0, None, None, None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.n = state.get("n", 0)  # finite steps seen: calls and finite steps agree from here
        self._mean, self._var, self._count = None, None, None
        if self.n and math.isfinite(state.get("mean", math.nan)):
            self._mean = torch.tensor(state["mean"])
            self._var = torch.tensor(state["var"])
            self._count = torch.tensor(float(self.n))
