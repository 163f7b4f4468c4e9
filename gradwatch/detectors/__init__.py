"""Detectors judge statistics and return findings; one rule per module."""

from gradwatch.detectors.base import REGISTRY, Detector
from gradwatch.detectors.nonfinite import NonFinite


def default_detectors() -> list[Detector]:
    """A fresh instance of every implemented rule, in registry order."""
    return [cls() for cls in REGISTRY.values()]


__all__ = ["REGISTRY", "Detector", "NonFinite", "default_detectors"]
