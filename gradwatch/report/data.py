"""Read a finished (or killed) run back: its events file and the gradwatch curves in its TensorBoard files.

Everything the report shows comes from what the run wrote; nothing is recomputed from the model.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from gradwatch.findings import Action, Finding

#: Per-layer / per-module tag families (present only when the run used ``per_layer=True``).
LAYER_KINDS = ("grad_norm", "weight_norm", "update_ratio")
ACTIVATION_FIELDS = ("mean", "std", "max_abs", "zero_frac", "dead_unit_frac", "saturated_frac")


class ReportError(Exception):
    """The folder holds no readable run, or several: the message says what to pass instead."""


Series = tuple[np.ndarray, np.ndarray]  # (steps, values)


@dataclass
class Run:
    """What one run wrote. ``scalars`` maps each ``gradwatch/...`` TensorBoard tag to ``(steps, values)``."""

    run_dir: str
    events_path: str | None
    events: list[dict[str, Any]] = field(default_factory=list)
    tb_dirs: list[str] = field(default_factory=list)
    scalars: dict[str, Series] = field(default_factory=dict)
    #: Lines of the events file that could not be read, each as ``"line N: why"``.
    skipped: list[str] = field(default_factory=list)

    # findings, actions and summary are built from ``events`` on first use, once: the report reads
    # them several times, and a long run's file holds 100k events.
    @cached_property
    def findings(self) -> list[Finding]:
        return [Finding.from_dict(e) for e in self.events if e["kind"] == "finding"]

    @cached_property
    def actions(self) -> list[Action]:
        return [Action.from_dict(e) for e in self.events if e["kind"] == "action"]

    @cached_property
    def summary(self) -> dict[str, Any]:
        """The run's own summary line; for a run that was killed (no summary), one built from its events."""
        written = [e for e in self.events if e["kind"] == "summary"]
        if written and all(k in written[-1] for k in SUMMARY_KEYS):
            return written[-1]
        # here, not at the top: gradwatch.sinks imports torch (seconds), and only a killed run needs it
        from gradwatch.sinks.summary import build_summary

        # the last step anything was written at (per-step rows are thinned; reads come every_n_steps)
        last = max((int(s[0][-1]) + 1 for s in self.scalars.values() if len(s[0])), default=0)
        epochs = max((f.epoch for f in self.findings), default=0) + 1
        built = build_summary(
            self.findings,
            self.actions,
            status="unknown (no summary line: the run was killed or is still running)",
            steps=last,
            epochs=epochs,
            remedies=[],
            ranges={},
            events_path=self.events_path,
        )
        return {**built, **written[-1]} if written else built  # a summary missing fields: filled in

    def per_layer(self, kind: str) -> dict[str, Series]:
        """``{layer: (steps, values)}`` for ``kind`` in :data:`LAYER_KINDS` (empty without ``per_layer=True``)."""
        prefix = f"gradwatch/{kind}/"
        return {
            t[len(prefix) :]: s
            for t, s in self.scalars.items()
            if t.startswith(prefix) and t != prefix + "total"
        }

    def activations(self, field_name: str) -> dict[str, Series]:
        """``{module: (steps, values)}`` of one activation field (empty without ``per_layer=True``)."""
        out = {}
        for tag, series in self.scalars.items():
            head, _, last = tag.rpartition("/")
            if head.startswith("gradwatch/activations/") and last == field_name:
                out[head[len("gradwatch/activations/") :]] = series
        return out

    @property
    def has_per_layer(self) -> bool:
        return bool(self.per_layer("grad_norm"))


def find_events(run_dir: str) -> str | None:
    """``RUN_DIR/gradwatch/events.jsonl``, else the one ``events.jsonl`` found below ``run_dir``."""
    if os.path.isfile(run_dir):
        return run_dir
    default = os.path.join(run_dir, "gradwatch", "events.jsonl")
    if os.path.isfile(default):
        return default
    found = sorted(glob.glob(os.path.join(run_dir, "**", "events.jsonl"), recursive=True))
    if len(found) > 1:
        runs = "\n  ".join(os.path.dirname(os.path.dirname(p)) if "gradwatch" in p else p for p in found)
        raise ReportError(f"{run_dir} holds {len(found)} runs; report one of them:\n  {runs}")
    return found[0] if found else None


def _tb_dirs(root: str) -> list[str]:
    files = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})


def read_scalars(tb_dirs: list[str]) -> dict[str, Series]:
    """Every ``gradwatch/`` scalar of the TensorBoard event files in ``tb_dirs``, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for d in tb_dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("gradwatch/"):
                points = merged.setdefault(tag, {})
                for e in acc.Scalars(tag):
                    points[e.step] = e.value
    out = {}
    for tag, points in merged.items():
        steps = np.array(sorted(points), dtype=np.int64)
        out[tag] = (steps, np.array([points[s] for s in steps], dtype=np.float64))
    return out


#: What a summary line must hold for the report to show it as written.
SUMMARY_KEYS = ("status", "verdict", "steps", "epochs", "rules", "actions")


def read_events_tolerant(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The events file's readable lines, and ``"line N: why"`` for each one skipped: a half-written
    last line, a line that is not JSON or not UTF-8 (NUL bytes, a disk error), a finding or action
    that does not parse (an unknown severity, a missing field)."""
    events, skipped, _, _ = _read_events(path)
    return events, skipped


def _read_events(path: str) -> tuple[list[dict[str, Any]], list[str], list[Finding], list[Action]]:
    """:func:`read_events_tolerant`, and the findings and actions it parsed to check them (kept: each
    line is parsed once)."""
    events: list[dict[str, Any]] = []
    skipped: list[str] = []
    findings: list[Finding] = []
    actions: list[Action] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
                if "\x00" in text:
                    raise UnicodeError("NUL bytes")
                event = json.loads(text)
                kind = event["kind"]
                parsed: Finding | Action | None = None
                if kind == "finding":
                    parsed = Finding.from_dict(event)
                elif kind == "action":
                    parsed = Action.from_dict(event)
            except UnicodeError as err:
                skipped.append(f"line {n}: not text ({err.reason if hasattr(err, 'reason') else err})")
                continue
            except json.JSONDecodeError:
                skipped.append(f"line {n}: not JSON (a half-written line?)")
                continue
            except (KeyError, TypeError, ValueError) as err:
                skipped.append(f"line {n}: not a gradwatch event ({type(err).__name__}: {err})")
                continue
            events.append(event)
            if isinstance(parsed, Finding):
                findings.append(parsed)
            elif parsed is not None:
                actions.append(parsed)
    return events, skipped, findings, actions


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Read a run folder (a logger's version folder, or any folder holding one run's files).

    Raises:
        ReportError: when the folder does not exist, holds neither an events file nor TensorBoard
            files, or holds several runs.
    """
    run_dir = os.fspath(run_dir)
    if not os.path.exists(run_dir):
        raise ReportError(f"{run_dir} does not exist; pass a run folder such as lightning_logs/version_0")
    events_path = find_events(run_dir)
    root = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    if events_path and os.path.basename(os.path.dirname(events_path)) == "gradwatch":
        tb_root = os.path.dirname(os.path.dirname(events_path))  # the logger's version folder
        tb_dirs = _tb_dirs(tb_root) or _tb_dirs(root)
    else:
        tb_dirs = _tb_dirs(root)
    if events_path is None and len(tb_dirs) > 1:
        raise ReportError(
            f"{run_dir} holds {len(tb_dirs)} runs; report one of them:\n  " + "\n  ".join(tb_dirs)
        )
    if events_path is None and not tb_dirs:
        raise ReportError(
            f"{run_dir} holds no gradwatch events file (gradwatch/events.jsonl) and no TensorBoard event "
            "files; pass the folder a HealthMonitor run wrote to (trainer.log_dir)"
        )
    events, skipped, findings, actions = _read_events(events_path) if events_path else ([], [], [], [])
    run = Run(run_dir, events_path, events, tb_dirs, read_scalars(tb_dirs), skipped)
    run.findings, run.actions = findings, actions  # what the properties would build: parsed once
    return run


def finite(series: Series) -> Series:
    steps, values = series
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def value_range(series: Series) -> tuple[float, float, int]:
    """``(min, max, non-finite count)`` of a series; ``nan`` bounds when nothing is finite."""
    _, v = finite(series)
    bad = int(len(series[1]) - len(v))
    return (float(v.min()), float(v.max()), bad) if len(v) else (math.nan, math.nan, bad)
