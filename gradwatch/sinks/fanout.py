"""One fan-out to every sink: rank zero writes, and a sink that fails is turned off, not the run.

:func:`default_sinks` is the one place the standard sinks are set up, for the Lightning callback and
for ``Watch`` alike: the events file, TensorBoard through the given loggers, logging, and alerts.
"""

from __future__ import annotations

import logging
from typing import Any

from gradwatch.findings import Action, Finding
from gradwatch.sinks.alerts import Alerts
from gradwatch.sinks.base import Sink
from gradwatch.sinks.console import Console
from gradwatch.sinks.events import EventsFile
from gradwatch.sinks.tensorboard import TensorBoard
from gradwatch.sinks.tensorboard_rows import Rows

log = logging.getLogger("gradwatch")


def default_sinks(config: Any, events_path: str | None, loggers: list[Any], rank_zero: bool) -> list[Sink]:
    """The standard sinks of a run (``config``: a :class:`gradwatch.config.Config`): rank zero writes,
    the other ranks get none."""
    if not rank_zero:
        return []
    sinks: list[Sink] = [EventsFile(events_path)] if events_path is not None else []
    sinks += [TensorBoard(loggers), Console(config.print_summary)]
    if config.targets:
        sinks.append(Alerts(config.targets, run=config.name))
    return sinks


class SinkSet:
    """Calls every sink in turn. A sink that raises is logged once (its name, the call, the error) and
    dropped for the rest of the run; training goes on. Empty on ranks other than zero.

    It also turns each read into the rows every sink's ``scalars`` gets (:class:`Rows`): per-step rows
    every ``meta["log_every_n_steps"]`` steps (50 by default; every measured step with
    ``meta["every_step"]`` false, that is ``measure="scheduled"``) and at every notable step.
    """

    def __init__(self, sinks: list[Sink] | None = None) -> None:
        self.sinks: list[Sink] = list(sinks or [])
        #: sink name -> what failed (the call and the error): the summary says what was not written
        self.failed: dict[str, str] = {}
        self.rows = Rows(50, self.scalars)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def __iter__(self):  # noqa: ANN204 - iterator of Sink
        return iter(list(self.sinks))

    def _call(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as err:  # a sink's failure must never stop training
                self.sinks.remove(sink)
                name = sink.name or type(sink).__name__
                self.failed[name] = f"{method} ({type(err).__name__}: {err})"
                log.warning(
                    "gradwatch: the %s sink failed in %s; it is off for the rest of the run",
                    name,
                    self.failed[name],
                )
                try:
                    sink.close()
                except Exception:  # noqa: BLE001 - closing a broken sink is best effort
                    pass

    def start(self, meta: dict[str, Any]) -> None:
        every = int(meta.get("log_every_n_steps", 50)) if meta.get("every_step", True) else 1
        self.rows = Rows(every, self.scalars)
        self.rows.start(bool(meta.get("per_layer", False)))
        self._call("start", meta)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._call("scalars", step, values)

    def validation(self, step: int, val_loss: float) -> None:
        self._call("validation", step, val_loss)

    def read(self, stats: Any, notable: set[int]) -> None:
        """A read's :class:`~gradwatch.stats.Stats`; ``notable``: steps with a finding or an action."""
        if self.sinks:
            self.rows.read(stats, notable)

    def close_curves(self) -> None:
        """Write the rows the last read kept back (the run's end, or a finding that makes them notable)."""
        if self.sinks:
            self.rows.close_curves()

    def finding(self, finding: Finding) -> None:
        self._call("finding", finding)

    def action(self, action: Action) -> None:
        self._call("action", action)

    def summary(self, summary: dict[str, Any]) -> None:
        self._call("summary", summary)

    def close(self) -> None:
        self._call("close")
        self.sinks = []
