"""A short health status in Lightning's progress bar: ``health=ok``, ``health=2 warn``, ``health=1 crit``.

``self.log`` takes numbers only, so the status cannot be a logged metric. Lightning's documented way
to change what a progress bar shows is its ``get_metrics(trainer, pl_module)`` method ("Implement this
to override the items displayed in the progress bar", ``ProgressBar.get_metrics``), which both the
TQDM and the Rich bar call each time they refresh. gradwatch does not replace the user's progress bar:
at fit start it wraps the ``get_metrics`` of the trainer's own bar (``trainer.progress_bar_callback``,
public) on that instance only, and removes the wrapper at fit end. No private attribute is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gradwatch.findings import Finding, Severity

#: The key the status is shown under (tqdm renders it as ``health=ok``).
KEY = "health"


def health_status(findings: Sequence[Finding]) -> str:
    """``"ok"``, ``"2 warn"``, ``"1 crit"`` or ``"1 crit, 2 warn"`` (``info`` findings do not count).

    Example:
        >>> health_status([])
        'ok'
        >>> health_status([Finding("nonfinite", "critical", 3, 0, "net.0", "loss is nan")])
        '1 crit'
    """
    crit = sum(f.severity == Severity.CRITICAL for f in findings)
    warn = sum(f.severity == Severity.WARNING for f in findings)
    return _status(crit, warn)


def _status(crit: int, warn: int) -> str:
    parts = [f"{crit} crit"] * bool(crit) + [f"{warn} warn"] * bool(warn)
    return ", ".join(parts) or "ok"


class ProgressStatus:
    """Adds ``health`` to the items of a Lightning progress bar while attached.

    Args:
        counts: returns the run's findings so far by severity (``{"warning": 2, ...}``: the journal's
            running totals, called on each refresh of the bar). Reading totals costs the same after a
            million findings as after one, and keeps counting past the recent findings a monitor holds.
    """

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self._counts = counts
        self._bar: Any = None

    def status(self) -> str:
        """What the bar shows now: the counts of warning and critical findings so far."""
        counts = self._counts()
        return _status(counts.get(Severity.CRITICAL.value, 0), counts.get(Severity.WARNING.value, 0))

    def attach(self, trainer: Any) -> None:
        """Wrap ``trainer.progress_bar_callback.get_metrics``; a trainer without a bar is left alone."""
        self.detach()
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is None or not callable(getattr(bar, "get_metrics", None)):
            return
        original = bar.get_metrics  # the bound method of the bar's class (or the user's override)

        def get_metrics(trainer: Any, pl_module: Any) -> dict[str, Any]:
            items = dict(original(trainer, pl_module))
            items[KEY] = self.status()
            return items

        get_metrics.__gradwatch__ = True  # type: ignore[attr-defined]
        bar.get_metrics = get_metrics  # an instance attribute: shadows the class method on this bar only
        self._bar = bar

    def detach(self) -> None:
        """Remove the wrapper; the bar's own ``get_metrics`` shows again."""
        bar, self._bar = self._bar, None
        if bar is not None and getattr(bar.__dict__.get("get_metrics"), "__gradwatch__", False):
            del bar.get_metrics
