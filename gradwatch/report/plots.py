"""The report's plots: matplotlib figures rendered to base64 PNG strings.

matplotlib is imported inside the functions only, through its object-oriented ``Figure`` API with the
Agg canvas: no pyplot, no global backend, nothing imported by ``import gradwatch``.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

from gradwatch.report.data import Run, Series, finite
from gradwatch.report.marks import SEVERITIES, LossMarks, loss_marks
from gradwatch.report.text import HEALTHY_UPDATE_RATIO, TYPICAL_UPDATE_RATIO

SEVERITY_COLOR = {"info": "#4c78a8", "warning": "#f58518", "critical": "#d62728"}
ACTION_COLOR = "#7b3fbf"


def _figure(height: float = 3.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _matrix(per: dict[str, Series], transform: Any = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Rows = names, columns = the union of their steps; missing cells NaN."""
    names = list(per)
    steps = np.unique(np.concatenate([s for s, _ in per.values()]))
    col = {int(s): i for i, s in enumerate(steps)}
    m = np.full((len(names), len(steps)), np.nan)
    for r, name in enumerate(names):
        s, v = per[name]
        m[r, [col[int(x)] for x in s]] = v
    if transform is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            m = transform(m)
    return names, steps, m


def _heatmap(
    ax: Any, per: dict[str, Series], title: str, cbar: str, log: bool = False, vmax: Any = None
) -> None:
    import matplotlib as mpl

    names, steps, m = _matrix(per, (lambda x: np.log10(np.where(x > 0, x, np.nan))) if log else None)
    cmap = mpl.colormaps["viridis" if log else "magma"].copy()
    cmap.set_bad("#bbbbbb")
    masked = np.ma.masked_invalid(m)
    edges = np.concatenate([steps, [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]])
    mesh = ax.pcolormesh(
        edges, np.arange(len(names) + 1), masked, cmap=cmap, vmin=0 if not log else None, vmax=vmax
    )
    ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(mesh, ax=ax, label=cbar, pad=0.01)


def plot_loss(run: Run, marks: LossMarks | None = None) -> str:
    """The loss curve, a line at each finding and a triangle at each action (``marks``: where)."""
    fig = _figure(3.6)
    ax = fig.add_subplot()
    train = run.scalars.get("gradwatch/loss/train")
    if train is not None:
        s, v = finite(train)
        ax.plot(s, v, color="#333333", lw=1, label="train loss")
        bad = train[0][~np.isfinite(train[1])]
        if len(bad):
            ax.plot(
                bad,
                np.full(len(bad), np.nanmax(v) if len(v) else 1.0),
                "x",
                color="#d62728",
                label="non-finite loss",
            )
        if len(v) and v.min() > 0 and v.max() / v.min() > 100:
            ax.set_yscale("log")
    val = run.scalars.get("gradwatch/loss/val")
    if val is not None:
        ax.plot(*finite(val), "o-", ms=3, color="#2ca02c", label="val loss")
    marks = marks or loss_marks(run.findings, run.actions)
    for sev in SEVERITIES:  # one collection per severity (a line per finding step), the worst on top
        if marks.lines.get(sev):
            ax.vlines(
                marks.lines[sev],
                0,
                1,
                transform=ax.get_xaxis_transform(),
                colors=SEVERITY_COLOR[sev.value],
                lw=1.2,
                alpha=0.8,
                zorder=1,  # behind the loss curve
                label=f"{sev.value} finding",
            )
    for step, rule, sev in marks.labels:
        ax.annotate(
            rule,
            (step, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
            color=SEVERITY_COLOR[sev.value],
        )
    if marks.actions:
        ax.plot(
            marks.actions,
            np.full(len(marks.actions), 0.04),
            "^",
            ms=9,
            color=ACTION_COLOR,
            transform=ax.get_xaxis_transform(),
            label="action",
        )
    ax.set_xlabel("step")
    ax.set_title("training loss, with findings (lines) and actions (triangles)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_grad_heatmap(run: Run) -> str:
    fig = _figure(0.8 + 0.28 * max(len(run.per_layer("grad_norm")), 4))
    _heatmap(
        fig.add_subplot(),
        run.per_layer("grad_norm"),
        "gradient norm per layer (grey: NaN/Inf or zero)",
        "log10 ‖g‖",
        log=True,
    )
    return _png(fig)


def plot_activations(run: Run) -> str:
    fields = [
        ("dead_unit_frac", "dead units (zero for every sample)"),
        ("zero_frac", "zero fraction (<= 0)"),
        ("saturated_frac", "saturated fraction"),
    ]
    n = len(run.activations("dead_unit_frac"))
    fig = _figure(3 * (0.6 + 0.25 * max(n, 4)))
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (name, title) in zip(axes, fields, strict=True):
        _heatmap(ax, run.activations(name), f"activations per module: {title}", "fraction", vmax=1.0)
    return _png(fig)


def plot_update_ratios(run: Run) -> str:
    fig = _figure(3.6)
    ax = fig.add_subplot()
    low, high = HEALTHY_UPDATE_RATIO
    ax.axhspan(low, high, color="#2ca02c", alpha=0.10, label=f"healthy {low:g}..{high:g}")
    ax.axhline(
        TYPICAL_UPDATE_RATIO, color="#2ca02c", ls="--", lw=1, label=f"typical ~{TYPICAL_UPDATE_RATIO:g}"
    )
    per = run.per_layer("update_ratio") or {
        "total": run.scalars.get("gradwatch/update_ratio/total", (np.array([]), np.array([])))
    }
    for name, series in per.items():
        s, v = finite(series)
        keep = v > 0
        ax.plot(s[keep], v[keep], marker=".", lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("update / weight ratio ‖Δw‖/‖w‖ per layer", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    return _png(fig)


def plot_totals(run: Run) -> str:
    """Without per-layer curves: the totals every run logs."""
    fig = _figure(3.2)
    ax1, ax2 = fig.subplots(1, 2)
    g = run.scalars.get("gradwatch/grad_norm/total")
    if g is not None:
        ax1.plot(*finite(g), lw=1)
        ax1.set_yscale("log")
    ax1.set_title("gradient norm (total)", fontsize=10)
    for tag, label in (
        ("max_dead_unit_frac", "dead units"),
        ("max_saturated_frac", "saturated"),
        ("max_zero_frac", "zero"),
    ):
        series = run.scalars.get(f"gradwatch/activations/{tag}")
        if series is not None:
            ax2.plot(*finite(series), marker=".", lw=1, label=label)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_title("activations: worst module", fontsize=10)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("step")
    return _png(fig)
