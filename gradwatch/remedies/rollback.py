"""``rollback``: restore the last healthy state held in host memory, then lower the learning rate."""

from __future__ import annotations

from typing import Any

from gradwatch.detectors.base import check_count, check_threshold
from gradwatch.findings import Action, Finding, Severity
from gradwatch.remedies.base import Remedy
from gradwatch.remedies.reduce_lr import first_lr


def _nonfinite(step: int, epoch: int, message: str, evidence: dict[str, float], advice: str) -> Finding:
    """A critical ``nonfinite`` finding raised by per-step protection (no layer: it is about the steps)."""
    return Finding("nonfinite", Severity.CRITICAL, step, epoch, None, message, evidence, advice)


class Rollback(Remedy):
    """Load the newest healthy snapshot (model, optimizer state, scaler), then multiply the LR by
    ``lr_factor`` (0.5) after non-finite failures, or by ``divergence_lr_factor`` (0.1) after a
    divergence — the practitioner's "restart from the last good checkpoint with a 10x lower LR" — or by
    more, down to the learning rate the snapshot was taken with, when a schedule has raised it since.
    The LR schedulers are not rewound and the optimizers keep their live learning rates: the schedule
    follows the steps the run has taken, and the user's own LR changes stay.

    Snapshots are taken (:class:`~gradwatch.remedies.snapshot_policy.SnapshotPolicy`) after reads whose
    own steps were healthy (no unstable finding raised by the read, no unstable episode younger than 200
    steps, everything read finite), every ``snapshot_every`` steps (default: every 20 at most, no more often than keeps the
    copying under 1% of the training time, and never more than 200 steps or 5% of the run apart, so a
    rollback loses a bounded amount of progress), copied to host memory, ``keep`` (2) of them; their
    size is in the summary. A resumed run keeps its restored state at its first batch. Answers
    non-finite *weights* (the model is corrupted), repeated non-finite steps (after ``skip_step``
    skipped ``max_consecutive`` in a row), non-finite steps that ``skip_step``'s deferred decision let
    through (to the newest snapshot taken before the first of them, the learning rate unchanged) and a
    ``divergence`` whose gradient norms rose with the loss (a loss rise alone is never enough: it may be
    noise, a signed or non-progress loss). Otherwise the snapshot used is the newest one taken at least
    ``margin`` (20) steps before the finding's step, so a state already drifting is not restored. The
    progress-judging rules (divergence, loss_plateau, exploding_gradients) go back to their state at
    that snapshot.
    Gradients are cleared after the restore.

    Under DDP (every rank holds the same weights and optimizer state) rank 0 alone keeps the snapshot
    copies; the other ranks mark the same steps, and a rollback broadcasts rank 0's restored state to
    them (one ``broadcast`` per tensor), so every rank goes on from the same bits. Each rank's summary
    says what it holds (``snapshot_mib`` 0 on the others). Sharded models (FSDP2, ``DTensor``) keep each
    rank's own shards on that rank. Where the time budget decides, the ranks decide together (due when
    due on every rank: one all-reduce of a flag on those reads), so every rank snapshots at the same steps.
    """

    name = "rollback"
    answers = ("nonfinite", "divergence", "exploding_gradients")

    def __init__(
        self,
        lr_factor: float = 0.5,
        divergence_lr_factor: float = 0.1,
        margin: int = 20,
        cooldown_steps: int = 10,
        budget: int = 5,
    ) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.lr_factor = check_threshold("Rollback", "lr_factor", lr_factor, example=0.5)
        self.divergence_lr_factor = check_threshold(
            "Rollback", "divergence_lr_factor", divergence_lr_factor, example=0.1
        )
        self.margin = check_count("Rollback", "margin", margin, low=-1, example=20)

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        if finding.rule == "nonfinite" and "nonfinite_layers" not in finding.evidence:
            if "loss_scale" in finding.evidence or ctx.skipping:
                return None  # the scaler's business, or skip_step's (which escalates here when it repeats)
        return self.restore(finding, ctx)

    def restore(
        self, finding: Finding, ctx: Any, margin: int | None = None, keep_lr: bool = False
    ) -> Action | None:
        """Load the newest snapshot at least ``margin`` (default :attr:`margin`) steps older than
        ``finding`` (``ctx``: a RemedyContext); ``margin=1``: the newest taken before its step.
        ``keep_lr``: no LR cut (one bad batch that got through says nothing about the learning rate)."""
        training, snaps = ctx.context, ctx.snapshots
        if training is None or not snaps.ring:
            return None
        margin = self.margin if margin is None else margin
        while len(snaps.ring) > 1 and snaps.ring[-1].step > finding.step - margin:
            snaps.ring.pop()
        before = first_lr(ctx)
        snap = snaps.restore(training)  # the optimizers keep their live learning rates (and multiplier)
        if snap is None:  # a DDP rank without the copy, reading alone at a failing run's end
            return None
        for p in training.model.parameters():
            p.grad = None  # nothing of the bad step leaks into the next one
        factor = 1.0 if keep_lr else self.lr_factor
        if finding.rule == "divergence":
            factor = self.divergence_lr_factor
            if before > 0 and snap.lr > 0:  # the LR the snapshot was healthy with, if the schedule rose since
                factor = min(factor, snap.lr / before)
        lowered = factor < 1
        if lowered:
            ctx.lr.scale(factor)
        after = first_lr(ctx)
        message = (
            f"restored the state of step {snap.step} ({snap.nbytes / 2**20:.1f} MiB from host memory)"
            + (f" and lowered the learning rate {1 / factor:.3g}x" if lowered else "")
        )
        return self.action(
            finding,
            message,
            restored_step=snap.step,
            lr_before=before,
            lr_after=after,
            snapshot_mib=snap.nbytes / 2**20,
        )

    @staticmethod
    def leaked(step: int, epoch: int, steps: int) -> Finding:
        """The finding a deferred skip decision raises when non-finite gradients reached the weights."""
        return _nonfinite(
            step,
            epoch,
            f"non-finite gradients were applied from step {step} on ({steps} step(s) until this read): the "
            "skip decision waits for the read",
            {"nonfinite_steps": float(steps)},
            "The weights may be corrupted. gradwatch rolls back to the last snapshot taken before that step "
            "(the learning rate unchanged: one bad batch says nothing about it), and from now on decides every "
            'step before it is taken (one host read per step, as SkipStep(mode="exact") does from the start).',
        )

    @staticmethod
    def escalation(step: int, epoch: int, skipped: int) -> Finding:
        """The finding a run of skipped steps raises when it asks for a rollback."""
        return _nonfinite(
            step,
            epoch,
            f"{skipped} optimizer steps in a row had non-finite gradients; skipping is not enough",
            {"consecutive_skips": float(skipped)},
            "Training keeps producing NaN/Inf gradients: the weights or optimizer state are likely "
            "corrupted. gradwatch rolls back to the last healthy state and lowers the learning rate.",
        )
