"""When a rollback snapshot is taken: the snapshot policy, after each read.

A read's state is kept (:class:`SnapshotPolicy`) when a snapshot is due (``Snapshots.due_by_steps``, the
time budget) and the read is :func:`healthy`: its own steps were, and no sign of instability is young.
"""

from __future__ import annotations

import math
from typing import Any

from gradwatch import distributed
from gradwatch.findings import Finding
from gradwatch.remedies.snapshots import MAX_SNAPSHOT_GAP, Snapshots

#: Rules that mean the run is unstable: no rollback snapshot is taken on a read that raised one, nor while
#: one of their episodes is young (opened less than ``MAX_SNAPSHOT_GAP`` steps ago).
UNSTABLE = ("nonfinite", "gradient_spike", "loss_spike", "exploding_gradients", "divergence")


def healthy(new: list[Finding], young_episodes: list[str], stats: Any) -> bool:
    """Whether a read shows a state worth keeping for rollback: its own steps are healthy. No sign of
    instability raised by this read, no unstable episode opened less than ``MAX_SNAPSHOT_GAP`` steps ago
    (``young_episodes``: their severities), no non-finite loss, gradient or weight in what was read. A
    young episode may be a divergence under way, whose states a rollback must not go back to; one that
    stays open longer (a missing ``zero_grad``, raw logits into ``nll_loss``) is the run's steady state,
    and does not stop snapshots for good: otherwise every rollback of such a run went back to its random
    initial weights. Lasting conditions that a rollback would not cure (unnormalized inputs, a plateau,
    dead units) do not count against it either."""
    if any(f.severity != "info" and f.rule in UNSTABLE for f in new):
        return False
    if any(sev != "info" for sev in young_episodes):
        return False
    if stats is None:
        return True
    if any(r.grad_nonfinite or (r.loss is not None and not math.isfinite(r.loss)) for r in stats.steps):
        return False
    return all(math.isfinite(v) for v in stats.weight_norm.values())


class SnapshotPolicy:
    """Takes a snapshot after a read when one is due (:meth:`Snapshots.due`) and the read is
    :func:`healthy`. Every rank keeps snapshots at the same steps: the step counts and the health are
    the same on every rank (the read is all-reduced); where the time budget decides, which each rank
    measures for itself, the ranks decide together: due when it is due on every rank (one all-reduce of
    a flag, ``Context.reduce_any``, on those reads only)."""

    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots
        self._opened: dict[tuple[str, str], int] = {}  # (rule, episode) -> the read that first saw it open

    def young(self, step: int, detectors: list[Any]) -> list[str]:
        """The severities of the unstable episodes open now that opened less than ``MAX_SNAPSHOT_GAP``
        steps ago (first seen open at a read: the same read on every rank)."""
        open_now = {
            (d.rule, key): sev for d in detectors if d.rule in UNSTABLE for key, sev in d.active.items()
        }
        self._opened = {k: self._opened.get(k, step) for k in open_now}
        return [sev for k, sev in open_now.items() if step - self._opened[k] < MAX_SNAPSHOT_GAP]

    def after_read(self, step: int, new: list[Finding], detectors: list[Any], stats: Any, ctx: Any) -> None:
        training, snaps = ctx.context, self.snapshots
        due = snaps.due_by_steps(step) if training is not None else False
        if due is False:
            return
        if not healthy(new, self.young(step, detectors), stats):
            return
        if due is None:  # the time budget: each rank's own, so due when due on every rank
            due = snaps.within_budget()
            if training.world_size > 1:
                if not distributed.together():
                    return  # a rank reading alone (a failing run's end): no collective, no snapshot
                due = not training.reduce_any(not due)
            if not due:
                return
        lr = stats.steps[-1].lr if stats is not None and stats.steps else None
        snap = snaps.take(step, training, lr if lr is not None else math.nan)
        snap.detectors = {type(d).__name__: d.state_dict() for d in detectors}
