"""Remedies change training in answer to findings; one remedy per module.

Importing this package registers every remedy in :data:`REGISTRY`, in ladder order.
"""

from gradwatch.remedies.base import REGISTRY, Remedy, resolve_remedies
from gradwatch.remedies.context import BestWeights, Context, LRControl, Snapshots
from gradwatch.remedies.skip_step import SkipStep
from gradwatch.remedies.clip_gradients import ClipGradients
from gradwatch.remedies.reduce_lr import ReduceLR
from gradwatch.remedies.rollback import Rollback
from gradwatch.remedies.reinitialize import Reinitialize
from gradwatch.remedies.early_stop import EarlyStop

__all__ = [
    "REGISTRY",
    "BestWeights",
    "ClipGradients",
    "Context",
    "EarlyStop",
    "LRControl",
    "ReduceLR",
    "Reinitialize",
    "Remedy",
    "Rollback",
    "SkipStep",
    "Snapshots",
    "resolve_remedies",
]
