"""``gradwatch report``: a run's health afterwards, from what it wrote (events file + TensorBoard files).

Example::

    from gradwatch.report import load_run, render_text, write_html

    run = load_run("lightning_logs/version_0")
    print(render_text(run))
    write_html(run, "report.html")  # needs matplotlib: pip install 'gradwatch[report]'
"""

from __future__ import annotations

from typing import Any

from gradwatch.report.data import ReportError, Run, load_run
from gradwatch.report.text import render_text


def write_html(run: Run, path: str) -> str:
    """Write the self-contained HTML report to ``path`` (imports matplotlib on first use)."""
    from gradwatch.report.html import write_html as _write

    return _write(run, path)


def render_html(run: Run) -> Any:
    from gradwatch.report.html import render_html as _render

    return _render(run)


__all__ = ["ReportError", "Run", "load_run", "render_html", "render_text", "write_html"]
