"""gradwatch: a training-health monitor for PyTorch Lightning.

``import gradwatch`` is light: the Lightning callback and the torch-using core are imported on first
use of ``gradwatch.HealthMonitor`` / ``gradwatch.Watch`` / ``gradwatch.Monitor``; the callback for the
``lightning`` package is ``gradwatch.lightning.HealthMonitor`` (``import gradwatch.lightning``).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any

from gradwatch.errors import ConfigError
from gradwatch.findings import REMEDIES, RULES, Action, Finding, Severity

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gradwatch.callback import HealthMonitor
    from gradwatch.monitor import Monitor
    from gradwatch.watch import Watch

_LAZY = {"HealthMonitor": "gradwatch.callback", "Monitor": "gradwatch.monitor", "Watch": "gradwatch.watch"}


class _StderrUntilConfigured(logging.Handler):
    """gradwatch's lines on stderr, message only, while no other handler would get them: Python's
    ``logging.lastResort``, from INFO (the summary) on. It looks at the handlers on the record's way
    up at each record, so an application that configures logging after ``import gradwatch``
    (``basicConfig``, a handler on ``gradwatch``) gets every line once, from its own handler."""

    @property
    def stream(self) -> Any:  # looked up at each record, as lastResort does: redirections apply
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return  # the application's handler shows it
            logger = logger.parent if logger.propagate else None
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging never raises into training, as StreamHandler
            self.handleError(record)


# Like Lightning's own logger, gradwatch shows INFO; unlike it, it never stops propagation.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not any(isinstance(h, _StderrUntilConfigured) for h in _logger.handlers):
    _logger.addHandler(_StderrUntilConfigured())


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
