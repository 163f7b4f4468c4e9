"""The sink interface: sinks only write what the monitor found, did and measured."""

from __future__ import annotations

from typing import Any

from gradwatch.findings import Action, Finding


class Sink:
    """Base class; every method is optional. Sinks run on rank zero only."""

    name = ""

    def start(self, meta: dict[str, Any]) -> None:
        """Called once when a fit starts."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Scalar statistics at ``step``; keys are TensorBoard tags under ``gradwatch/``. Which rows come,
        at which steps, is :mod:`gradwatch.sinks.tensorboard_rows` (``log_every_n_steps``)."""

    def validation(self, step: int, val_loss: float) -> None:
        """A validation loss, after optimizer step ``step``: a ``gradwatch/loss/val`` scalar by default."""
        self.scalars(step, {"gradwatch/loss/val": val_loss})

    def finding(self, finding: Finding) -> None:
        """A new finding."""

    def action(self, action: Action) -> None:
        """A remedy action."""

    def summary(self, summary: dict[str, Any]) -> None:
        """The end-of-run summary (also on a failed run)."""

    def close(self) -> None:
        """Release files and handles; may be called more than once."""
