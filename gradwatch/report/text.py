"""The report as plain text: verdict, rules fired, actions taken, and the statistics that matter."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch.report.data import Run, finite, value_range

#: Update/weight ratios outside this band mean the layer barely moves or is being overwritten;
#: ~1e-3 per step is the usual rule of thumb (Karpathy, CS231n "ratio of weights:updates").
HEALTHY_UPDATE_RATIO = (1e-5, 1e-1)
TYPICAL_UPDATE_RATIO = 1e-3

NO_PER_LAYER = (
    "per-layer statistics: not recorded (the run used per_layer=False; "
    "HealthMonitor(per_layer=True) records per-layer gradient norms, update ratios and activations)"
)


def fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) and math.isfinite(x) else str(x)


def verdict_lines(run: Run) -> list[str]:
    s = run.summary
    lines = [
        f"verdict: {s['verdict'].upper()} (run {s['status']}, {s['steps']} optimizer steps, {s['epochs']} epoch(s))"
    ]
    lines.append("rules fired:" if s["rules"] else "rules fired: none")
    if s["rules"]:
        lines.append(f"  {'rule':<22} {'severity':<9} {'first step':>10} {'count':>6}  layer")
        for r in s["rules"]:
            lines.append(
                f"  {r['rule']:<22} {r['severity']:<9} {r['first_step']:>10} {r['count']:>6}  {r['layer'] or '-'}"
            )
    if s["actions"]:
        lines.append("actions taken:")
        lines.append(f"  {'remedy':<22} {'first step':>10} {'count':>6}  answering")
        for a in s["actions"]:
            lines.append(
                f"  {a['remedy']:<22} {a['first_step']:>10} {a['count']:>6}  {', '.join(a['rules'])}"
            )
    else:
        mode = ", ".join(s.get("remedies") or []) or "remedies off"
        lines.append(f"actions taken: none ({mode})")
    return lines


def _series_line(name: str, run: Run, tag: str) -> str | None:
    if tag not in run.scalars:
        return None
    lo, hi, bad = value_range(run.scalars[tag])
    values = run.scalars[tag][1]
    last = fmt(float(values[-1])) if len(values) else "-"
    extra = f", non-finite at {bad} step(s)" if bad else ""
    return f"  {name:<34} min {fmt(lo)}, max {fmt(hi)}, last {last}{extra}"


def statistics_rows(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Per-layer and per-module tables (empty lists without per-layer curves)."""
    layers = []
    grads, ratios, weights = (
        run.per_layer("grad_norm"),
        run.per_layer("update_ratio"),
        run.per_layer("weight_norm"),
    )
    for layer in grads:
        lo, hi, bad = value_range(grads[layer])
        row: dict[str, Any] = {"layer": layer, "grad_min": lo, "grad_max": hi, "grad_nonfinite": bad}
        _, r = finite(ratios.get(layer, (np.array([]), np.array([]))))
        r = r[r > 0]
        row["ratio_median"] = float(np.median(r)) if len(r) else math.nan
        row["ratio_min"] = float(r.min()) if len(r) else math.nan
        row["ratio_max"] = float(r.max()) if len(r) else math.nan
        low, high = HEALTHY_UPDATE_RATIO
        row["ratio_flag"] = (
            ""
            if not len(r)
            else "too small"
            if row["ratio_median"] < low
            else "too large"
            if row["ratio_median"] > high
            else "ok"
        )
        _, w = weights.get(layer, (np.array([]), np.array([])))
        row["weight_last"] = float(w[-1]) if len(w) else math.nan
        layers.append(row)
    modules = []
    dead, zero, sat = (
        run.activations("dead_unit_frac"),
        run.activations("zero_frac"),
        run.activations("saturated_frac"),
    )
    for module in dead:
        row = {"module": module}
        for key, per in (("dead", dead), ("zero", zero), ("saturated", sat)):
            _, v = finite(per.get(module, (np.array([]), np.array([]))))
            row[f"{key}_max"] = float(v.max()) if len(v) else math.nan
            last = per.get(module, (np.array([]), np.array([math.nan])))[1]
            row[f"{key}_last"] = float(last[-1]) if len(last) else math.nan
        modules.append(row)
    return {"layers": layers, "modules": modules}


def render_text(run: Run, max_findings: int = 10) -> str:
    """The whole text report."""
    lines = [f"gradwatch report: {run.run_dir}"]
    lines.append(f"  events file: {run.events_path or 'none found (verdict from TensorBoard curves only)'}")
    curves = len(run.scalars)
    lines.append(
        f"  TensorBoard: {', '.join(run.tb_dirs) or 'no event files found'} ({curves} gradwatch curves)"
    )
    if run.skipped:
        shown = "; ".join(run.skipped[:5]) + ("; ..." if len(run.skipped) > 5 else "")
        lines.append(f"  skipped {len(run.skipped)} unreadable line(s) of the events file: {shown}")
    lines += verdict_lines(run)
    findings = run.findings
    if findings:
        lines.append(
            f"findings ({len(findings)}{', first ' + str(max_findings) if len(findings) > max_findings else ''}):"
        )
        for f in findings[:max_findings]:
            lines.append(f"  {f}")
            lines.append(f"    advice: {f.advice}")
    lines.append("statistics:")
    for name, tag in (
        ("loss (train)", "gradwatch/loss/train"),
        ("loss (val)", "gradwatch/loss/val"),
        ("gradient norm (total)", "gradwatch/grad_norm/total"),
        ("update / weight ratio (total)", "gradwatch/update_ratio/total"),
        ("dead-unit fraction (worst module)", "gradwatch/activations/max_dead_unit_frac"),
        ("saturated fraction (worst module)", "gradwatch/activations/max_saturated_frac"),
        ("input max |x|", "gradwatch/inputs/max_abs"),
    ):
        line = _series_line(name, run, tag)
        if line:
            lines.append(line)
    if not run.scalars:
        lines.append("  no TensorBoard curves (the run had no TensorBoardLogger)")
    rows = statistics_rows(run)
    if not rows["layers"]:
        lines.append(NO_PER_LAYER)
        return "\n".join(lines)
    low, high = HEALTHY_UPDATE_RATIO
    lines.append(
        f"per layer (update ratio healthy band {low:g}..{high:g}, typical ~{TYPICAL_UPDATE_RATIO:g}):"
    )
    lines.append(
        f"  {'layer':<20} {'grad norm min..max':>22} {'non-finite':>10} {'update ratio median':>20}"
        f"  {'':<9} {'last weight norm':>16}"
    )
    for r in rows["layers"]:
        lines.append(
            f"  {r['layer']:<20} {fmt(r['grad_min']) + '..' + fmt(r['grad_max']):>22} {r['grad_nonfinite']:>10}"
            f" {fmt(r['ratio_median']):>20}  {r['ratio_flag']:<9} {fmt(r['weight_last']):>16}"
        )
    if rows["modules"]:
        lines.append("activations per module (max over the run / last):")
        lines.append(f"  {'module':<20} {'dead units':>16} {'zero frac':>16} {'saturated':>16}")
        for r in rows["modules"]:
            cells = [f"{fmt(r[k + '_max'])} / {fmt(r[k + '_last'])}" for k in ("dead", "zero", "saturated")]
            lines.append(f"  {r['module']:<20} {cells[0]:>16} {cells[1]:>16} {cells[2]:>16}")
    return "\n".join(lines)
