"""Where the loss plot marks findings and actions: one line per finding step, one triangle per action
step, and, for a run with more steps than a plot can show apart, one mark per bin of steps.

Pure numpy, no matplotlib: the HTML page states what was aggregated (:attr:`LossMarks.note`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gradwatch.findings import Action, Finding, Severity

#: At most this many finding lines (and as many action triangles) in the loss plot, about 2 pixels
#: apart on its 1000-pixel axes; beyond, the steps are grouped into this many equal bins.
MAX_MARKS = 500
#: At most this many rule names written along the top of the loss plot; beyond, each rule is named
#: once, at its first finding.
MAX_LABELS = 40

SEVERITIES = (Severity.INFO, Severity.WARNING, Severity.CRITICAL)  # drawn in this order: worst on top


@dataclass
class LossMarks:
    """``lines``: severity -> steps to draw a line at; ``labels``: (step, rule, severity) to name;
    ``actions``: steps to draw a triangle at; ``note``: what was aggregated, or ``None``."""

    lines: dict[Severity, list[int]] = field(default_factory=dict)
    labels: list[tuple[int, str, Severity]] = field(default_factory=list)
    actions: list[int] = field(default_factory=list)
    note: str | None = None


def _bins(steps: np.ndarray, lo: int, width: int) -> np.ndarray:
    return (steps - lo) // width


def loss_marks(findings: list[Finding], actions: list[Action], max_marks: int = MAX_MARKS) -> LossMarks:
    """The marks for ``findings`` and ``actions``: each finding step (with each severity it has) and
    each action step as it is, or, when there are more than ``max_marks`` distinct steps, the first
    step of each occupied bin (``max_marks`` bins over the run), coloured by the bin's worst severity.

    Example:
        >>> nan = Finding("nonfinite", "critical", 6, 0, None, "loss is nan")
        >>> dead = Finding("dead_units", "warning", 6, 0, "net.0", "half the units are dead")
        >>> m = loss_marks([nan, dead], [])
        >>> m.lines[Severity.CRITICAL], m.lines[Severity.WARNING], m.note
        ([6], [6], None)
    """
    marks = LossMarks()
    steps = np.array([f.step for f in findings], dtype=np.int64)
    ranks = np.array([f.severity.rank for f in findings], dtype=np.int64)
    act = np.unique(np.array([a.step for a in actions], dtype=np.int64))
    every = np.concatenate([steps, act])
    lo, hi = (int(every.min()), int(every.max())) if len(every) else (0, 0)
    width = max(1, -(-(hi - lo + 1) // max_marks))  # ceil: max_marks bins cover lo..hi
    notes = []
    unique = np.unique(steps)
    if len(unique) > max_marks:
        bins = _bins(steps, lo, width)
        worst = np.full(max_marks, -1)
        first = np.full(max_marks, hi + 1)
        np.maximum.at(worst, bins, ranks)
        np.minimum.at(first, bins, steps)
        used = worst >= 0
        for sev in SEVERITIES:
            marks.lines[sev] = first[used & (worst == sev.rank)].tolist()  # sync: none, NumPy
        notes.append(
            f"{len(findings)} findings at {len(unique)} steps: drawn as {int(used.sum())} lines, one per "
            f"{width}-step bin (colour: the worst severity in the bin)"
        )
    else:
        for sev in SEVERITIES:
            marks.lines[sev] = np.unique(steps[ranks == sev.rank]).tolist()  # sync: none, NumPy
    named: dict[tuple[int, str], Severity] = {}
    for f in findings:
        key = (f.step, f.rule)
        if key not in named or f.severity.rank > named[key].rank:
            named[key] = f.severity
    if len(named) > MAX_LABELS:
        firsts: dict[str, tuple[int, str]] = {}
        for step, rule in named:
            firsts.setdefault(rule, (step, rule))
        notes.append(f"rule names only at each rule's first finding ({len(firsts)} names, not {len(named)})")
        named = {key: named[key] for key in firsts.values()}
    marks.labels = [(step, rule, sev) for (step, rule), sev in named.items()]
    if len(act) > max_marks:
        first = np.unique(lo + _bins(act, lo, width) * width)  # each bin's start ...
        first = act[np.searchsorted(act, first)]  # ... moved to the first action in it
        marks.actions = first.tolist()  # sync: none, NumPy
        notes.append(
            f"{len(actions)} actions at {len(act)} steps: drawn as {len(first)} triangles, one per "
            f"{width}-step bin"
        )
    else:
        marks.actions = act.tolist()  # sync: none, NumPy
    marks.note = "; ".join(notes) + "." if notes else None
    return marks
