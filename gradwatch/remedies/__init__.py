"""Remedies change training in answer to findings; one remedy per module."""

from gradwatch.remedies.base import REGISTRY, Remedy, resolve_remedies

__all__ = ["REGISTRY", "Remedy", "resolve_remedies"]
