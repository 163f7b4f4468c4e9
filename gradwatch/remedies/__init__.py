"""Remedies change training in answer to findings; one remedy per module.

Importing this package registers every remedy in :data:`REGISTRY`; ``remedies="auto"`` takes them in
the order of :data:`gradwatch.findings.REMEDIES`.
"""

from gradwatch.remedies.base import REGISTRY, Remedy, resolve_remedies
from gradwatch.remedies.clip_gradients import ClipGradients
from gradwatch.remedies.context import BestWeights, Context, LRControl, Snapshots
from gradwatch.remedies.early_stop import EarlyStop
from gradwatch.remedies.reduce_lr import ReduceLR
from gradwatch.remedies.reinitialize import Reinitialize
from gradwatch.remedies.rollback import Rollback
from gradwatch.remedies.skip_step import SkipStep

#: Which remedies answer a rule, first choice first (a finding gets one action: the first remedy that acts).
LADDER: dict[str, tuple[str, ...]] = {
    "nonfinite": ("skip_step", "rollback"),
    "gradient_spike": ("clip_gradients",),
    "exploding_gradients": ("reduce_lr", "rollback"),
    "divergence": ("rollback", "reduce_lr"),
    "update_ratio": ("reduce_lr",),
    "dead_units": ("reinitialize",),
    "saturated_activations": ("reinitialize",),
    "poor_initialization": ("reinitialize",),
    "overfitting": ("early_stop",),
}

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
    "Rollback",
    "SkipStep",
    "Snapshots",
    "resolve_remedies",
]
