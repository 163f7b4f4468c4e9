"""A monitor's checkpoint state: what changes over a run, saved and loaded by name.

Keys (``STATE_VERSION`` 1, unchanged by the core's rewrite, so older checkpoints load): ``detectors`` (by
class name), ``remedies`` (by id), ``findings`` and ``actions`` (the most recent ``journal.RECENT`` of
each), ``journal`` (the run's totals per rule and per remedy, :class:`gradwatch.journal.Tally`; rebuilt
from ``findings`` and ``actions`` for a checkpoint without it), ``steps_seen``, ``last_step``,
``last_epoch``, ``ranges``, ``lr`` (the multiplier), ``best_val_loss``, ``best_step``, ``deferred``
(findings judged while a checkpoint was written, answered at the next read), ``val_loss`` (a validation
loss not yet judged), ``last_probe`` (the step of the last heavy probe). Fields missing from an older
checkpoint load with their defaults. :func:`fresh` is the state of a new fit.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from gradwatch.findings import Action, Finding
from gradwatch.sinks.summary import Ranges

STATE_VERSION = 1

log = logging.getLogger("gradwatch")


def save(monitor: Any) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "detectors": {type(d).__name__: d.state_dict() for d in monitor.detectors},
        "remedies": {r.name: r.state_dict() for r in monitor.remedies},
        "findings": [f.to_dict() for f in monitor.findings],
        "actions": [a.to_dict() for a in monitor.actions],
        "journal": monitor.journal.tally.state(),
        "steps_seen": monitor.steps_seen,
        "last_step": monitor.last_step,
        "last_epoch": monitor.last_epoch,
        "ranges": {k: dict(v) for k, v in monitor.ranges.items()},
        "lr": monitor.lr.state(),
        "best_val_loss": monitor.best.loss,
        "best_step": monitor.best.step,
        "deferred": [f.to_dict() for f in monitor.deferred],
        "val_loss": monitor.pending_val_loss,
        "last_probe": monitor.cadence.last_probe,
    }


def fresh(monitor: Any) -> None:
    """A new fit without a checkpoint: nothing of an earlier fit on this monitor carries over (k-fold and
    seed loops reuse one): no LR multiplier, findings, actions, spent budgets, snapshots or baselines."""
    monitor.responder.new_run()
    monitor.judge.new_run()
    monitor.lr.new_run()
    monitor.journal.clear()
    monitor.deferred = []
    monitor.steps_seen, monitor.last_step, monitor.last_epoch = 0, -1, 0
    monitor.summary_ranges = Ranges()
    monitor.pending_val_loss = None
    monitor.cadence.last_probe = None


def load(monitor: Any, state: dict[str, Any]) -> None:
    monitor.snapshots.ring.clear()  # snapshots of this process's earlier fit are not the checkpoint's run
    for d in monitor.detectors:
        if type(d).__name__ in state.get("detectors", {}):
            d.load_state_dict(state["detectors"][type(d).__name__])
    for r in monitor.remedies:
        if r.name in state.get("remedies", {}):
            r.load_state_dict(state["remedies"][r.name])
    monitor.journal.load(
        [Finding.from_dict(f) for f in state.get("findings", [])],
        [Action.from_dict(a) for a in state.get("actions", [])],
        state.get("journal"),
    )
    monitor.steps_seen = state.get("steps_seen", 0)
    monitor.last_step = state.get("last_step", -1)
    monitor.last_epoch = state.get("last_epoch", 0)
    monitor.summary_ranges = Ranges(state.get("ranges", {}))
    monitor.lr.load(state.get("lr", {}))
    if state.get("version", STATE_VERSION) > STATE_VERSION:
        log.warning(
            "gradwatch: checkpoint state version %s is newer than this gradwatch's %s",
            state.get("version"),
            STATE_VERSION,
        )
    # the weights are not in the checkpoint: early stop keeps the last weights unless a better one comes
    monitor.best.loss = float(state.get("best_val_loss", math.inf))
    monitor.best.step = int(state.get("best_step", -1))
    monitor.deferred = [Finding.from_dict(f) for f in state.get("deferred", [])]
    monitor.pending_val_loss = state.get("val_loss")
    monitor.cadence.last_probe = state.get("last_probe")
