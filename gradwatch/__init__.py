"""gradwatch: a training-health monitor for PyTorch Lightning.

``import gradwatch`` is light: the Lightning callback and the torch-using core are imported on first
use of ``gradwatch.HealthMonitor`` / ``gradwatch.Watch`` / ``gradwatch.Monitor``; the callback for the
``lightning`` package is ``gradwatch.lightning.HealthMonitor`` (``import gradwatch.lightning``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from gradwatch.errors import ConfigError
from gradwatch.findings import REMEDIES, RULES, Action, Finding, Severity

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gradwatch.callback import HealthMonitor
    from gradwatch.monitor import Monitor
    from gradwatch.watch import Watch

_LAZY = {"HealthMonitor": "gradwatch.callback", "Monitor": "gradwatch.monitor", "Watch": "gradwatch.watch"}

# Like Lightning's own logger: show INFO (the summary) unless the application configured logging.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers() and not _logger.handlers:
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


__all__ = [
    "REMEDIES",
    "RULES",
    "Action",
    "ConfigError",
    "Finding",
    "HealthMonitor",
    "Monitor",
    "Severity",
    "Watch",
]
