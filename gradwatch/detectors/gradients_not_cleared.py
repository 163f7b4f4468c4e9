"""``gradients_not_cleared``: ``optimizer.zero_grad()`` is missing, so every step adds all past gradients."""

from __future__ import annotations

import math

from gradwatch.detectors.base import Detector
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats


class GradientsNotCleared(Detector):
    """At a scheduled step, every watched parameter that got a gradient found ``.grad`` holding a nonzero
    gradient each time a backward added one in (``gradwatch/probes/leftover.py``): nothing cleared it
    since the last optimizer step. The optimizer then steps with the sum of all gradients since the start, momentum with a
    coefficient of 1: the update grows step after step and the run blows up within tens of steps (found at
    step 69 as ``exploding_gradients`` before this rule, and the remedies for that made it worse).

    Gradients accumulated on purpose are left alone: Lightning's ``accumulate_grad_batches`` and a plain
    loop that calls ``backward`` on k micro-batches before each step both start the step from a cleared
    gradient, which is all the probe asks. Lightning's automatic optimization always clears; the bug shows
    in plain and Fabric loops (``gradwatch.Watch``) and under manual optimization (``opt.step()`` without
    ``opt.zero_grad()``), and in an overridden ``optimizer_zero_grad`` that does nothing.
    Gradients a loop assigns itself (``p.grad = g`` from ``torch.autograd.grad``) are not added in, and
    not judged.

    Threshold: exact (a leftover is nonzero or it is not), on one read; the first read after the first
    optimizer step can see it. While this is open no remedy answers the gradient rules' findings
    (``gradwatch/remedies/responder.py``, ``SYMPTOMS``): lowering the LR or rolling back cannot repair it.
    Severity: critical. Evidence: the held and the new gradient's norms at the first arrival, and their
    ratio (under a GradScaler the held gradient is unscaled and the new one is not). Source: PyTorch's
    "Zeroing out gradients in PyTorch" recipe (recipes/recipes/zeroing_out_gradients).
    """

    rule = "gradients_not_cleared"
    assumes = (
        "Each optimizer step should start from cleared gradients (None or zeros) at some gradient arrival of "
        "its first batch; the smallest parameters the first optimizer steps stand for the rest."
    )
    advice = (
        "Gradients add up in .grad until something clears them: call optimizer.zero_grad() once per "
        "optimizer step (before loss.backward(), or right after optimizer.step()); under Lightning's "
        "manual optimization, opt.zero_grad() next to opt.step(). To accumulate over k batches on purpose, "
        "step and zero every k batches (or use Trainer(accumulate_grad_batches=k)). Lowering the learning "
        "rate does not fix this, so gradwatch's remedies leave the run's gradient findings alone meanwhile."
    )

    def check(self, step: int, stats: Stats) -> list[Finding]:
        seen = stats.leftover
        if seen is None or seen.fired == 0:
            return []
        if seen.stale < seen.fired:
            return self.resolve("stale", step, stats.epoch, None, "the gradients are cleared each step again")
        ratio = seen.held_norm / seen.new_norm if seen.new_norm > 0 else math.inf
        message = (
            f"when this step's gradients arrived (norm {seen.new_norm:.3g}), .grad still held {seen.held_norm:.3g} "
            f"({ratio:.3g}x) from earlier steps, in every watched parameter: optimizer.zero_grad() is not called, "
            "so each step adds up every gradient since the start"
        )
        evidence = {"held_norm": seen.held_norm, "new_norm": seen.new_norm, "ratio": ratio}
        return self.report(
            "stale", self.finding(Severity.CRITICAL, step, stats.epoch, None, message, evidence)
        )
