"""TensorBoard through the trainer's own loggers: no second writer.

Scalars go to every logger with ``log_metrics`` (TensorBoardLogger, CSVLogger, ...). Findings and
actions are also written as TensorBoard text, and a custom-scalars layout is registered once, when
the trainer has a TensorBoardLogger. Which rows a read writes, at which steps, under which tags, is
:mod:`gradwatch.sinks.tensorboard_rows` (driven by the fan-out, for every sink's ``scalars``).
"""

from __future__ import annotations

import re
from typing import Any

from gradwatch.findings import Action, Finding
from gradwatch.internals import event_file_writer, is_tensorboard_logger
from gradwatch.sinks.base import Sink


def scalar_writer(logger: Any) -> Any | None:
    """The event-file writer behind a TensorBoardLogger, for writing a step's scalars as one event; else None.

    Lightning's ``log_metrics`` writes one event per scalar through ``SummaryWriter.add_scalar``, and each
    event costs a hand-off to the writer's background thread, which computes a pure-Python CRC while
    holding the GIL (~65 us per event measured on a 2-core CPU; docs/performance.md). A read writes 4-10
    scalars for each step since the last read. One ``Summary`` holding every value of the step is one
    event, read back identically (same tags, steps and float32 values:
    ``tests/test_sinks.py::test_one_event_per_step_matches_log_metrics``).

    Private access: :func:`gradwatch.internals.event_file_writer` (a prefixed logger, or a writer without
    that method, keeps ``log_metrics``).
    """
    return event_file_writer(logger)


def scalars_summary(values: dict[str, float]) -> Any:
    """One TensorBoard ``Summary`` with a ``simple_value`` per tag (what ``add_scalar`` writes, grouped)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])


def block_of(name: str) -> str:
    """The top-level child a layer or module belongs to: ``"net.0" -> "net"``, ``"head" -> "head"``."""
    return name.split(".", 1)[0] or "model"


def _under(kind: str, block: str) -> str:
    """A regex for the per-layer tags of ``kind`` in ``block`` (the block itself or its sub-modules)."""
    b = "" if block == "model" else re.escape(block)
    return rf"^gradwatch/{kind}/{b}(\..+)?$" if b else rf"^gradwatch/{kind}/[^/]+$"


def block_layout(layers: list[str], modules: list[str]) -> dict[str, dict[str, list[Any]]]:
    """One Custom Scalars category per block (top-level child module): the loss next to that block's
    gradient norms, update/weight ratios and activation statistics (``per_layer=True`` tags).

    Example:
        >>> sorted(block_layout(["net.0", "net.2", "head"], ["net.0", "net.1", "head"]))
        ['gradwatch block: head', 'gradwatch block: net']
    """
    m = "Multiline"
    out: dict[str, dict[str, list[Any]]] = {}
    for block in dict.fromkeys(block_of(n) for n in [*layers, *modules]):
        charts: dict[str, list[Any]] = {"loss (train, val)": [m, [r"^gradwatch/loss/"]]}
        if any(block_of(n) == block for n in layers):
            charts["gradient norm"] = [m, [_under("grad_norm", block)]]
            charts["update / weight ratio"] = [m, [_under("update_ratio", block)]]
            charts["weight norm"] = [m, [_under("weight_norm", block)]]
        if any(block_of(n) == block for n in modules):
            acts = _under("activations", block)[:-1]  # the module, then /<field>
            for title, fields in (
                ("activations: zero / dead fraction", "(zero_frac|dead_unit_frac)"),
                ("activations: saturated fraction", "saturated_frac"),
                ("activations: std", "std"),
            ):
                charts[title] = [m, [acts + "/" + fields + "$"]]
        out[f"gradwatch block: {block}"] = charts
    return out


def custom_scalars_layout(
    layers: list[str] | None = None, modules: list[str] | None = None
) -> dict[str, dict[str, list[Any]]]:
    """Charts that put related curves together (TensorBoard's Custom Scalars tab).

    With ``layers`` / ``modules`` (the names of a ``per_layer=True`` run), one more category per block:
    see :func:`block_layout`.
    """
    m = "Multiline"
    blocks = block_layout(layers or [], modules or []) if layers or modules else {}
    return {
        "gradwatch": {
            "loss (train, val)": [m, [r"gradwatch/loss/.*"]],
            "gradient norm": [m, [r"gradwatch/grad_norm/.*"]],
            "weight norm": [m, [r"gradwatch/weight_norm/.*"]],
            "update / weight ratio": [m, [r"gradwatch/update_ratio/.*"]],
            "learning rate": [m, [r"gradwatch/lr"]],
            "non-finite gradients": [m, [r"gradwatch/nonfinite/.*"]],
            "inputs": [m, [r"gradwatch/inputs/.*"]],
        },
        "gradwatch activations": {
            "zero / dead fraction": [m, [r"gradwatch/activations/.*(zero_frac|dead_unit_frac)"]],
            "saturated fraction": [m, [r"gradwatch/activations/.*saturated_frac"]],
            "std": [m, [r"gradwatch/activations/.*/std"]],
            "max |x|": [m, [r"gradwatch/activations/.*max_abs"]],
        },
        **blocks,
    }


def finding_markdown(f: Finding) -> str:
    evidence = ", ".join(f"{k}={v:.4g}" for k, v in f.evidence.items())
    return (
        f"**{f.severity.value.upper()}** `{f.rule}` at step {f.step}"
        + (f" in `{f.layer}`" if f.layer else "")
        + f"  \n{f.message}  \nevidence: {evidence}  \nadvice: {f.advice}"
    )


class TensorBoard(Sink):
    """Writes through ``loggers`` (the trainer's). With no logger it writes nothing."""

    name = "tensorboard"

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = list(loggers)
        self._tb = [lg for lg in self.loggers if is_tensorboard_logger(lg)]
        self._writers: list[tuple[Any, Any | None]] | None = None  # (logger, event writer or None)

    def start(self, meta: dict[str, Any]) -> None:
        per_layer = meta.get("per_layer", False)
        layers = meta.get("layers", []) if per_layer else []
        modules = meta.get("modules", []) if per_layer else []
        for lg in self._tb:
            lg.experiment.add_custom_scalars(custom_scalars_layout(layers, modules))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not values:
            return
        if self._writers is None:  # resolved on first use: the logger's experiment is created lazily
            self._writers = [(lg, scalar_writer(lg)) for lg in self.loggers]
        summary = None
        for lg, writer in self._writers:
            if writer is None:
                lg.log_metrics(values, step=step)
            else:  # one event for the step's scalars (see scalar_writer)
                summary = summary if summary is not None else scalars_summary(values)
                writer.add_summary(summary, step)

    def _text(self, tag: str, text: str, step: int, flush: bool = True) -> None:
        for lg in self._tb:
            lg.experiment.add_text(tag, text, global_step=step)
            if flush:
                lg.experiment.flush()

    def finding(self, finding: Finding) -> None:
        self._text("gradwatch/findings", finding_markdown(finding), finding.step)

    def action(self, action: Action) -> None:
        detail = ", ".join(f"{k}={v}" for k, v in action.detail.items())
        self._text(
            "gradwatch/actions",
            f"**{action.remedy}** at step {action.step} answering `{action.rule}`  \n{action.message}  \n{detail}",
            action.step,
            # everyday adaptive clipping is not worth a file flush each time (the events file has it at
            # once); the writer's own flush, or the next finding or action, brings it to TensorBoard
            flush=not action.detail.get("routine", False),
        )

    def close(self) -> None:
        self._tb = []
        self.loggers = []
        self._writers = None
