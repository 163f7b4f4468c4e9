"""Which TensorBoard rows a read writes, at which steps, under which tags.

Per-step rows (``gradwatch/grad_norm/total``, ``loss/train``, ``lr``, ``nonfinite/grad_params``,
``amp/loss_scale``, ``amp/scaler_skipped``) every ``log_every_n_steps`` steps and at every notable step
(a finding or an action at that step, a non-finite value, a step the GradScaler skipped). Then the read's
own row (``weight_norm/total``, ``update_ratio/total``, ``inputs/*``, ``activations/max_*``, and with
``per_layer`` the per-layer tags) at the run's first read, at the first read after a step of the logging
cadence or a notable step, and with heavy-probe results. The last step's row and the last read's row, if
not written, are kept for :meth:`Rows.close_curves` to close the curves with.

Why not every step: each TensorBoard event costs ~25-60 us of the training thread (the writer's queue and
its pure-Python CRC; docs/performance.md), the same cadence Lightning gives the user's own ``self.log``
calls. Every step still reaches the detectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from gradwatch.probes.activations import FIELDS

Emit = Callable[[int, dict[str, float]], None]


def step_row(rec: Any) -> dict[str, float]:
    """A step's TensorBoard row, from its :class:`~gradwatch.stats.StepRecord`."""
    values = {"gradwatch/grad_norm/total": rec.grad_norm}
    if rec.grad_nonfinite:
        values["gradwatch/nonfinite/grad_params"] = rec.grad_nonfinite
    if rec.loss is not None:
        values["gradwatch/loss/train"] = rec.loss
    if rec.lr is not None:
        values["gradwatch/lr"] = rec.lr
    if rec.loss_scale is not None:
        values["gradwatch/amp/loss_scale"] = rec.loss_scale
        values["gradwatch/amp/scaler_skipped"] = float(rec.scaler_skipped)
    return values


def read_row(stats: Any, per_layer: bool) -> dict[str, float]:
    """A read's own row: weight norms, update ratios, the heavy probes' values (per layer too)."""
    values: dict[str, float] = {}
    if stats.weight_norm:
        values["gradwatch/weight_norm/total"] = math.sqrt(sum(v * v for v in stats.weight_norm.values()))
    if "total" in stats.update_ratio:
        values["gradwatch/update_ratio/total"] = stats.update_ratio["total"]
    if stats.inputs is not None:
        for name in ("mean", "std", "max_abs"):
            values[f"gradwatch/inputs/{name}"] = getattr(stats.inputs, name)
    if stats.activations:
        acts = stats.activations.values()
        values["gradwatch/activations/max_zero_frac"] = max(a.zero_frac for a in acts)
        values["gradwatch/activations/max_dead_unit_frac"] = max(a.dead_unit_frac for a in acts)
        values["gradwatch/activations/max_saturated_frac"] = max(a.saturated_frac for a in acts)
    if per_layer:
        for kind, per in (("grad_norm", stats.grad_norm), ("weight_norm", stats.weight_norm)):
            values.update({f"gradwatch/{kind}/{n}": v for n, v in per.items()})
        values.update(
            {f"gradwatch/update_ratio/{n}": v for n, v in stats.update_ratio.items() if n != "total"}
        )
        for name, a in stats.activations.items():
            for field_name in FIELDS:
                values[f"gradwatch/activations/{name}/{field_name}"] = getattr(a, field_name)
    return values


class Rows:
    """The row cadence of one run; ``emit(step, values)`` writes a row."""

    def __init__(self, log_every_n_steps: int, emit: Emit) -> None:
        self.every = max(1, int(log_every_n_steps))
        self.emit = emit
        self.per_layer = False
        self._tail_row: Any = None  # the last step's record, if its row is not written yet
        self._tail_values: tuple[int, dict[str, float]] | None = None  # the last read's row, if not written
        self._due = True  # a logging-cadence step has passed since the read row was last written

    def start(self, per_layer: bool) -> None:
        self.per_layer = per_layer
        self._tail_row, self._tail_values, self._due = None, None, True

    def _notable(self, rec: Any, notable: set[int]) -> bool:
        return (
            (rec.step + 1) % self.every == 0
            or rec.step in notable
            or rec.grad_nonfinite
            or rec.scaler_skipped
            or not math.isfinite(rec.grad_norm)
            or (rec.loss is not None and not math.isfinite(rec.loss))
        )

    def read(self, stats: Any, notable: set[int]) -> None:
        self._tail_row = None
        if notable or any((rec.step + 1) % self.every == 0 for rec in stats.steps):
            self._due = True
        for rec in stats.steps:
            if not self._notable(rec, notable):
                self._tail_row = rec
                continue
            self._tail_row = None
            self._due = True
            self.emit(rec.step, step_row(rec))
        values = read_row(stats, self.per_layer)
        if not values:
            return
        if self._due or stats.activations or stats.inputs is not None or stats.update_ratio:
            self.emit(stats.step, values)
            self._due, self._tail_values = False, None
        else:  # between the logging cadence's steps, as the per-step rows
            self._tail_values = (stats.step, values)

    def close_curves(self) -> None:
        """Write the rows the last read kept back: its own row (weight norms, ...), then its last step's."""
        if self._tail_values is not None:
            self.emit(*self._tail_values)
            self._tail_values, self._due = None, False
        if self._tail_row is not None:
            self.emit(self._tail_row.step, step_row(self._tail_row))
            self._tail_row = None
