"""The end-of-fit health summary: built from the run's totals of findings and actions, rendered as one
screen of text."""

from __future__ import annotations

import math
from typing import Any

from gradwatch.findings import Action, Finding, Severity
from gradwatch.journal import Tally


class Ranges:
    """The first, lowest, highest and last finite value of the loss and the gradient norm, for the summary."""

    def __init__(self, ranges: dict[str, dict[str, float]] | None = None) -> None:
        self.ranges: dict[str, dict[str, float]] = {k: dict(v) for k, v in (ranges or {}).items()}

    def track(self, stats: Any) -> None:
        """Every step of a read (:class:`~gradwatch.stats.Stats`)."""
        self._track("grad_norm", [rec.grad_norm for rec in stats.steps])
        self._track("loss", [rec.loss for rec in stats.steps if rec.loss is not None])

    def _track(self, name: str, values: list[float]) -> None:
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return
        low, high = min(finite), max(finite)
        r = self.ranges.setdefault(name, {"first": finite[0], "min": low, "max": high, "last": finite[-1]})
        r["min"], r["max"], r["last"] = min(r["min"], low), max(r["max"], high), finite[-1]


def run_summary(monitor: Any, status: str) -> dict[str, Any]:
    """The summary of a monitor's run (a :class:`gradwatch.monitor.Monitor`, read through its attributes)."""
    snapshots, best = monitor.snapshots, monitor.best
    return summarize(
        monitor.journal.tally,  # the whole run's counts: monitor.findings holds only the most recent
        status=status,
        steps=monitor.last_step + 1,
        epochs=monitor.last_epoch + 1,
        remedies=[r.name for r in monitor.remedies],
        ranges=monitor.ranges,
        events_path=monitor.events_path,
        memory={
            "snapshot_mib": round(snapshots.peak_bytes / 2**20, 3),
            "snapshots_kept": sum(s.held for s in snapshots.ring),  # copies this rank holds
            "best_weights_mib": round(best.nbytes / 2**20, 3),
        },
        lr_multiplier=monitor.lr.multiplier,
        setup=monitor.setup,
        lr=_live_lr(monitor),
        sink_errors=getattr(monitor.sinks, "failed", None),
    )


def _live_lr(monitor: Any) -> float | None:
    """The learning rate the first param group steps with now: the schedule's, the user's own changes and
    gradwatch's multiplier, all in (``None`` without optimizers)."""
    context = monitor.context
    opts = context.optimizers() if context is not None else []
    lr = opts[0].param_groups[0].get("lr") if opts and opts[0].param_groups else None
    return float(lr) if isinstance(lr, int | float) else None


def build_summary(findings: list[Finding], actions: list[Action], **options: Any) -> dict[str, Any]:
    """Group findings by rule (first step, count, worst severity, first layer) and actions by remedy;
    ``options``: those of :func:`summarize`."""
    return summarize(Tally.of(findings, actions), **options)


def summarize(
    tally: Tally,
    *,
    status: str,
    steps: int,
    epochs: int,
    remedies: list[str],
    ranges: dict[str, dict[str, float]],
    events_path: str | None,
    memory: dict[str, Any] | None = None,
    lr_multiplier: float = 1.0,
    setup: dict[str, Any] | None = None,
    lr: float | None = None,
    sink_errors: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The summary of a run's :class:`~gradwatch.journal.Tally`: its rules (first step, count, worst
    severity, first layer) and actions by remedy.

    ``memory``: what remedies hold (snapshots, best weights); ``lr_multiplier``: gradwatch's LR multiplier,
    written when it is not 1; ``setup``: the training setup (gradwatch.setups); ``lr``: the learning rate
    at the end, as the optimizer steps with it (the effective LR); ``sink_errors``: sink name -> the call
    that failed and the error (the sink wrote nothing after it: an events file that filled its disk is
    incomplete)."""
    rules = tally.rule_rows()
    worst = max((Severity(r["severity"]).rank for r in rules), default=-1)
    verdict = {-1: "healthy", 0: "healthy", 1: "warnings", 2: "critical"}[worst]
    summary = {
        "status": status,
        "verdict": verdict,
        "steps": steps,
        "epochs": epochs,
        "rules": rules,
        "actions": tally.action_rows(),
        "remedies": remedies,
        "ranges": ranges,
        "events_path": events_path,
    }
    if memory is not None:
        summary["memory"] = memory
    if lr_multiplier != 1.0:
        summary["lr_multiplier"] = lr_multiplier
    if lr is not None:
        summary["lr"] = lr
    if setup is not None:
        summary["setup"] = dict(setup)
    if sink_errors:
        summary["sink_errors"] = dict(sink_errors)
    return summary


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def render_summary(s: dict[str, Any]) -> str:
    """One screen of plain text: verdict, rules fired, actions taken, the ranges that matter."""
    lines = [
        f"gradwatch health summary: {s['verdict'].upper()} "
        f"({s['status']}, {s['steps']} optimizer steps, {s['epochs']} epoch(s))",
    ]
    if s["rules"]:
        lines.append(f"  {'rule':<22} {'severity':<9} {'first step':>10} {'count':>6}  layer")
        for r in s["rules"]:
            lines.append(
                f"  {r['rule']:<22} {r['severity']:<9} {r['first_step']:>10} {r['count']:>6}  {r['layer'] or '-'}"
            )
    else:
        lines.append("  no rule fired")
    if s["actions"]:
        lines.append(f"  {'action':<22} {'first step':>10} {'count':>6}  answering")
        for a in s["actions"]:
            lines.append(
                f"  {a['remedy']:<22} {a['first_step']:>10} {a['count']:>6}  {', '.join(a['rules'])}"
            )
    else:
        mode = "remedies off" if not s["remedies"] else "remedies: " + ", ".join(s["remedies"])
        lines.append(f"  no action taken ({mode})")
    if "lr" in s:
        scaled = f" (gradwatch's multiplier {_fmt(s['lr_multiplier'])} in)" if "lr_multiplier" in s else ""
        lines.append(f"  learning rate at the end: {_fmt(s['lr'])}{scaled}")
    for name, r in s["ranges"].items():
        lines.append("  " + name + ": " + ", ".join(f"{k} {_fmt(v)}" for k, v in r.items()))
    failed = dict(s.get("sink_errors") or {})
    if s["events_path"]:
        error = failed.pop("events", None)
        lost = f" (incomplete: nothing was written after the events sink failed in {error})" if error else ""
        lines.append(f"  events: {s['events_path']}{lost}")
    for name, error in failed.items():
        lines.append(f"  the {name} sink failed in {error}: it wrote nothing after that")
    return "\n".join(lines)
