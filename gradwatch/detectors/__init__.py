"""Detectors judge statistics and return findings; one rule per module.

Importing this package registers every rule in :data:`REGISTRY`; the default set runs them in the
order of :data:`gradwatch.findings.RULES`.
"""

from gradwatch.detectors.base import REGISTRY, Detector
from gradwatch.detectors.dead_units import DeadUnits
from gradwatch.detectors.divergence import Divergence
from gradwatch.detectors.eval_mode_training import EvalModeTraining
from gradwatch.detectors.exploding_gradients import ExplodingGradients
from gradwatch.detectors.frozen_weights import FrozenWeights
from gradwatch.detectors.gradient_spike import GradientSpike
from gradwatch.detectors.gradients_not_cleared import GradientsNotCleared
from gradwatch.detectors.loss_plateau import LossPlateau
from gradwatch.detectors.loss_spike import LossSpike
from gradwatch.detectors.lr_collapsed import LRCollapsed
from gradwatch.detectors.nonfinite import NonFinite
from gradwatch.detectors.overfitting import Overfitting
from gradwatch.detectors.poor_initialization import PoorInitialization
from gradwatch.detectors.repeated_batch import RepeatedBatch
from gradwatch.detectors.saturated_activations import SaturatedActivations
from gradwatch.detectors.unnormalized_inputs import UnnormalizedInputs
from gradwatch.detectors.unoptimized_parameters import UnoptimizedParameters
from gradwatch.detectors.update_ratio import UpdateRatio
from gradwatch.detectors.vanishing_gradients import VanishingGradients
from gradwatch.findings import RULES


def default_detectors() -> list[Detector]:
    """A fresh instance of every implemented rule, with its default thresholds, in contract order."""
    return [REGISTRY[rule]() for rule in RULES if rule in REGISTRY]


__all__ = [
    "REGISTRY",
    "DeadUnits",
    "Detector",
    "Divergence",
    "EvalModeTraining",
    "ExplodingGradients",
    "FrozenWeights",
    "GradientSpike",
    "GradientsNotCleared",
    "LossPlateau",
    "LossSpike",
    "LRCollapsed",
    "NonFinite",
    "Overfitting",
    "PoorInitialization",
    "RepeatedBatch",
    "SaturatedActivations",
    "UnnormalizedInputs",
    "UnoptimizedParameters",
    "UpdateRatio",
    "VanishingGradients",
    "default_detectors",
]
