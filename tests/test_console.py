"""What a user reads (issue 17, first items): the version, the callback's summary, a quiet setup line."""

from __future__ import annotations

import logging
import subprocess
import sys

from models import DigitsMLP, digits_loaders, trainer

import gradwatch
from gradwatch.sinks.events import read_events


def test_gradwatch_version():
    out = subprocess.run([sys.executable, "-m", "gradwatch", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"gradwatch {gradwatch.__version__}"


def test_health_monitor_summary_like_watch_and_the_setup_line_at_debug(tmp_path, caplog):
    monitor = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "events.jsonl"))
    assert monitor.summary is None
    with caplog.at_level(logging.INFO, logger="gradwatch"):
        trainer(tmp_path, [monitor], logger=False, max_steps=12, max_epochs=-1).fit(
            DigitsMLP(), digits_loaders()[0]
        )
    (written,) = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "summary"]
    summary = monitor.summary
    assert (summary["status"], summary["verdict"], summary["steps"]) == (
        written["status"],
        written["verdict"],
        written["steps"],
    )
    assert not [r for r in caplog.records if r.getMessage().startswith("gradwatch: setup")]
    with caplog.at_level(logging.DEBUG, logger="gradwatch"):
        trainer(tmp_path, [monitor], logger=False, max_steps=2, max_epochs=-1).fit(
            DigitsMLP(), digits_loaders()[0]
        )
    assert [r for r in caplog.records if r.getMessage().startswith("gradwatch: setup")]
