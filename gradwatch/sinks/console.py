"""Findings and actions to Python ``logging`` under the logger name ``gradwatch``."""

from __future__ import annotations

import logging
from typing import Any

from gradwatch.findings import Action, Finding, Severity
from gradwatch.sinks.base import Sink
from gradwatch.sinks.summary import render_summary

log = logging.getLogger("gradwatch")

_LEVEL = {Severity.INFO: logging.INFO, Severity.WARNING: logging.WARNING, Severity.CRITICAL: logging.ERROR}


class Console(Sink):
    """Logs each finding at INFO / WARNING / ERROR by severity, each action at WARNING, and the summary."""

    name = "console"

    def __init__(self, print_summary: bool = True) -> None:
        self.print_summary = print_summary

    def finding(self, finding: Finding) -> None:
        log.log(_LEVEL[finding.severity], "gradwatch: %s\n    advice: %s", finding, finding.advice)

    def action(self, action: Action) -> None:
        level = logging.INFO if action.detail.get("routine") else logging.WARNING
        log.log(level, "gradwatch action: %s %s", action, action.detail)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.print_summary:
            log.info("%s", render_summary(summary))
