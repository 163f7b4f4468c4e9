"""Remedies change training in answer to findings; one remedy per module.

Importing this package registers every remedy in :data:`REGISTRY`; ``remedies="auto"`` takes them in
the order of :data:`gradwatch.findings.REMEDIES`. Which remedy answers which rule is the ladder
(:data:`LADDER`, in ``responder.py``); per-step protection is ``guard.py``; the snapshot policy is in
``snapshots.py``.
"""

from gradwatch.remedies.base import REGISTRY, Remedy, resolve_remedies
from gradwatch.remedies.clip_gradients import ClipGradients
from gradwatch.remedies.context import Context, RemedyContext
from gradwatch.remedies.early_stop import EarlyStop
from gradwatch.remedies.lr_control import LRControl
from gradwatch.remedies.reduce_lr import ReduceLR
from gradwatch.remedies.reinitialize import Reinitialize
from gradwatch.remedies.rollback import Rollback
from gradwatch.remedies.skip_step import SkipStep
from gradwatch.remedies.snapshot_policy import SnapshotPolicy
from gradwatch.remedies.snapshots import BestWeights, Snapshots

from gradwatch.remedies.responder import LADDER, Responder  # isort: skip - after the remedies it orders
from gradwatch.remedies.guard import StepGuard  # isort: skip

__all__ = [
    "LADDER",
    "REGISTRY",
    "BestWeights",
    "ClipGradients",
    "Context",
    "EarlyStop",
    "LRControl",
    "ReduceLR",
    "Reinitialize",
    "Remedy",
    "RemedyContext",
    "Responder",
    "Rollback",
    "SkipStep",
    "SnapshotPolicy",
    "Snapshots",
    "StepGuard",
    "resolve_remedies",
]
