"""Probes compute statistics as device tensors; they never read values back to the host."""

from gradwatch.probes.activations import ActivationProbe
from gradwatch.probes.gradients import GradientProbe, foreach_norms
from gradwatch.probes.inputs import first_float_tensor, input_stats
from gradwatch.probes.layout import ParamLayout, layer_of
from gradwatch.probes.weights import WeightProbe

__all__ = [
    "ActivationProbe",
    "GradientProbe",
    "ParamLayout",
    "WeightProbe",
    "first_float_tensor",
    "foreach_norms",
    "input_stats",
    "layer_of",
]
