"""``clip_gradients``: adaptive, sync-free gradient clipping (ZClip's z-score rule)."""

from __future__ import annotations

import math
from typing import Any

import torch

from gradwatch.detectors.base import check_fraction, check_threshold
from gradwatch.findings import Action, Finding
from gradwatch.internals import foreach_mul_
from gradwatch.probes.gradients import wide
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
        self.alpha = check_fraction("ClipGradients", "alpha", alpha, example=0.97)
        self.warmup_steps = int(
            check_threshold("ClipGradients", "warmup_steps", warmup_steps, low=-1, example=25)
        )
        self.n = 0
        self._mean: torch.Tensor | float | None = None  # running statistics: host floats or device tensors
        self._var: torch.Tensor | float | None = None
        self._count: torch.Tensor | None = None  # finite steps seen, while the device arithmetic runs

    def clip(self, grads: list[torch.Tensor], sq_total: torch.Tensor | float) -> torch.Tensor | float:
        """Scale ``grads`` in place; returns the coefficient applied (1 when not clipped).

        Where the step's squared norm is decides where the arithmetic runs, on any device: a host float
        (skip_step's decision read it already) is :meth:`_clip_host`, a device tensor (no read: a fused
        optimizer skipping on the device, or no skip_step) is :meth:`_clip_device`. Two paths because the
        device one is ~35 tiny ops, each a kernel launch: inside a fit (``benchmarks/hook_times.py
        --batch-size 256`` with and without ``--clip-on-device``, a 13 ms CPU step) the skip decision and
        clipping take 49 us a step on the host against 436 us on the device, 2.9% of the step; on a GPU
        those launches would come right after the decision's sync, with the device idle. The running
        statistics move with the path (one read when the device arithmetic hands over to the host).
        """
        if isinstance(sq_total, float):
            return self._clip_host(grads, sq_total)
        return self._clip_device(grads, sq_total)

    def _clip_device(self, grads: list[torch.Tensor], sq_total: torch.Tensor) -> torch.Tensor:
        """Device ops only, no host read. A non-finite step neither starts, moves nor counts towards the
        warm-up (the count of finite steps is a device tensor); :attr:`n` counts calls."""
        norm = wide(sq_total.detach()).sqrt()  # float64, as the host's Python floats
        finite = torch.isfinite(norm)
        if self._mean is None or self._var is None:  # NaN until a finite norm is seen
            self._mean, self._var = torch.full_like(norm, math.nan), torch.zeros_like(norm)
            self._count = torch.zeros_like(norm)
        elif (
            self._count is None
            or not isinstance(self._mean, torch.Tensor)
            or self._mean.device != norm.device
        ):
            # loaded from a checkpoint, or the host arithmetic ran before: carry its state over
            self._mean = torch.as_tensor(self._mean, dtype=norm.dtype, device=norm.device)
            self._var = torch.as_tensor(self._var, dtype=norm.dtype, device=norm.device)
            self._count = torch.full_like(norm, float(self.n))
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

    def _clip_host(self, grads: list[torch.Tensor], sq: float) -> float:
        """The same rule on Python floats; :attr:`n` counts finite steps. Touches the gradients only when
        it clips."""
        norm = math.sqrt(sq) if sq >= 0 else math.nan
        finite = math.isfinite(norm)
        if self._count is not None:  # the device arithmetic ran before: its count of finite steps is n
            self.n = int(float(self._count))  # sync: once, when the path changes
        mean = float(self._mean) if self._mean is not None else None  # sync: once, when the path changes
        var = float(self._var) if self._var is not None else 0.0  # sync: once, when the path changes
        if mean is None or not math.isfinite(mean):  # nothing finite seen yet
            if finite:  # a non-finite step (skipped, or to be) neither starts nor counts
                self._mean, self._var, self.n, self._count = norm, 0.0, 1, None
            return 1.0
        coef, seen = 1.0, norm
        if self.n >= self.warmup_steps:
            threshold = mean + self.z * math.sqrt(var)
            if finite and norm > threshold:
                coef = threshold / (norm + 1e-12)
                foreach_mul_(grads, coef)
            seen = min(norm, threshold)
        if finite:
            d = seen - mean
            mean, var = mean + (1 - self.alpha) * d, self.alpha * (var + (1 - self.alpha) * d * d)
            self._mean, self._var, self.n = mean, var, self.n + 1
        self._count = None  # the device arithmetic, if it ever runs, starts from n
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
        self.n = state.get("n", 0)  # finite steps seen
        self._mean, self._var, self._count = None, None, None
        if self.n and math.isfinite(state.get("mean", math.nan)):
            self._mean, self._var = float(state["mean"]), float(state["var"])
