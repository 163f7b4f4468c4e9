"""The events file: one JSON object a line, flushed as each event is written.

Each line has ``"kind"`` (``finding``, ``action`` or ``summary``), a ``"time"`` (Unix seconds), and
the fields of :class:`~gradwatch.findings.Finding`, :class:`~gradwatch.findings.Action` or the summary.
Non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so that every line
is strict JSON.
"""

from __future__ import annotations

import json
import os
import time
from typing import IO, Any

from gradwatch.findings import Action, Finding
from gradwatch.sinks.base import Sink


class EventsFile(Sink):
    """Appends events to ``path`` (created with its folder on first write) and flushes each line."""

    name = "events"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file: IO[str] | None = None

    def write(self, kind: str, payload: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        line = json.dumps({"kind": kind, "time": round(time.time(), 3), **payload}, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()  # a crashed or killed run keeps every event written before it

    def finding(self, finding: Finding) -> None:
        self.write("finding", finding.to_dict())

    def action(self, action: Action) -> None:
        self.write("action", action.to_dict())

    def summary(self, summary: dict[str, Any]) -> None:
        self.write("summary", summary)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read an events file back: a list of dicts, in the order written."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
