"""The report as one self-contained HTML page: the plots (``plots.py``) embedded as base64 PNG.

Needs matplotlib (``pip install 'gradwatch[report]'``); nothing else is loaded by the page.
"""

from __future__ import annotations

import html
from typing import Any

from gradwatch.report.data import Run
from gradwatch.report.marks import loss_marks
from gradwatch.report.plots import (
    plot_activations,
    plot_grad_heatmap,
    plot_loss,
    plot_totals,
    plot_update_ratios,
)
from gradwatch.report.text import NO_PER_LAYER, fmt, statistics_rows, verdict_lines

#: Findings listed with their advice; the page says how many more the run had.
MAX_FINDINGS = 20


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(fmt(c) if isinstance(c, float) else str(c))}</td>" for c in r)
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(run: Run) -> str:
    """The whole page as a string."""
    s = run.summary
    color = {"healthy": "#2ca02c", "warnings": "#f58518", "critical": "#d62728"}.get(s["verdict"], "#555")
    parts = [f'<p class="verdict" style="background:{color}">{html.escape(verdict_lines(run)[0])}</p>']
    if s["rules"]:
        parts.append(
            "<h2>Rules fired</h2>"
            + _table(
                ["rule", "severity", "first step", "count", "layer"],
                [
                    [r["rule"], r["severity"], r["first_step"], r["count"], r["layer"] or "-"]
                    for r in s["rules"]
                ],
            )
        )
    parts.append(
        "<h2>Actions taken</h2>"
        + (
            _table(
                ["remedy", "first step", "count", "answering"],
                [[a["remedy"], a["first_step"], a["count"], ", ".join(a["rules"])] for a in s["actions"]],
            )
            if s["actions"]
            else "<p>none</p>"
        )
    )
    findings = run.findings
    if findings:
        shown = findings[:MAX_FINDINGS]
        items = "".join(
            f"<li><b>{html.escape(str(f))}</b><br><i>advice:</i> {html.escape(f.advice)}</li>" for f in shown
        )
        more = len(findings) - len(shown)
        head = f"Findings ({len(findings)}" + (f", first {len(shown)})" if more else ")")
        tail = (
            f"<p class='note'>{more} more findings in the events file; the rules table counts them all.</p>"
        )
        parts.append(f"<h2>{head}</h2><ol>{items}</ol>" + (tail if more else ""))
    if run.scalars:
        marks = loss_marks(findings, run.actions)
        note = f"<p class='note'>{html.escape(marks.note)}</p>" if marks.note else ""
        parts.append("<h2>Loss</h2>" + _img(plot_loss(run, marks), "loss with findings and actions") + note)
    else:
        parts.append("<h2>Loss</h2><p>no TensorBoard curves</p>")
    if run.has_per_layer:
        parts.append(
            "<h2>Gradient norm per layer</h2>" + _img(plot_grad_heatmap(run), "gradient norm heatmap")
        )
        if run.activations("dead_unit_frac"):
            parts.append(
                "<h2>Activations per module</h2>" + _img(plot_activations(run), "activation statistics")
            )
        parts.append("<h2>Update / weight ratios</h2>" + _img(plot_update_ratios(run), "update ratios"))
        rows = statistics_rows(run)
        parts.append(
            "<h2>Per layer</h2>"
            + _table(
                [
                    "layer",
                    "grad norm min",
                    "grad norm max",
                    "non-finite",
                    "update ratio median",
                    "",
                    "last weight norm",
                ],
                [
                    [
                        r["layer"],
                        r["grad_min"],
                        r["grad_max"],
                        r["grad_nonfinite"],
                        r["ratio_median"],
                        r["ratio_flag"],
                        r["weight_last"],
                    ]
                    for r in rows["layers"]
                ],
            )
        )
    elif run.scalars:
        parts.append(f"<p class='note'>{html.escape(NO_PER_LAYER)}</p>")
        parts.append("<h2>Totals</h2>" + _img(plot_totals(run), "total gradient norm and activations"))
        if "gradwatch/update_ratio/total" in run.scalars:
            parts.append("<h2>Update / weight ratio</h2>" + _img(plot_update_ratios(run), "update ratio"))
    title = f"gradwatch report: {run.run_dir}"
    style = (
        "body{font-family:sans-serif;max-width:1140px;margin:1em auto;color:#222}"
        ".verdict{color:#fff;padding:.5em 1em;border-radius:4px;font-weight:bold}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        "img{max-width:100%;display:block}li{margin-bottom:.4em;font-size:13px}.note{color:#666}"
        "h2{font-size:16px;margin-top:1.2em}"
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1 style='font-size:20px'>{html.escape(title)}</h1>"
        + "\n".join(parts)
        + "</body></html>"
    )


def write_html(run: Run, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(run))
    return path
