"""Per-step records: what each optimizer step leaves on the device until the next read.

An optimizer step opens a :class:`StepRow` at its first ``before_optimizer_step`` (a second optimizer of
the same step adds its norms to it), its batches add their losses, and the batch end closes it. Nothing
is derived per step: at the read, :func:`derive` turns every pending row into the ``ROW_FIELDS`` values
(``gradwatch.stats``) with a handful of device ops for all of them at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradwatch.probes.gradients import nonfinite_summary, wide

#: Rows kept on device before a read is forced, whatever the schedule says.
MAX_PENDING_ROWS = 1024


@dataclass(slots=True)
class StepRow:
    """One optimizer step, recorded on device."""

    step: int
    epoch: int
    lr: float | None
    norms: list[torch.Tensor] = field(default_factory=list)  # one vector per optimizer stepped
    positions: list[torch.Tensor] = field(default_factory=list)  # their places in the ParamLayout
    losses: list[torch.Tensor] = field(default_factory=list)  # one per (micro-)batch
    scale_before: torch.Tensor | None = None  # GradScaler's scale before the step (copied)
    scale: torch.Tensor | None = None  # ... after it, and whether it skipped the step (scale lowered)
    skipped: torch.Tensor | None = None
    device_skip: bool = False  # skip_step decided on device (a fused optimizer's found_inf): tallied later
    deferred: bool = False  # skip_step's decision waits for the read (rolled back there if not finite)
    clip: float | torch.Tensor = 1.0  # clip_gradients' coefficient (a device scalar once it ran)


class Recorder:
    """The open step, the pending ones, and the losses of batches not yet closed into a step."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.open: StepRow | None = None
        self.rows: list[StepRow] = []
        self.losses: list[torch.Tensor] = []
        self.grad_layers: torch.Tensor | None = None  # the scheduled step's per-layer squared norms

    def start(self, step: int, epoch: int, lr: float | None, loss_scale: torch.Tensor | None) -> StepRow:
        """The step's first optimizer is about to step: open its row (or return the open one)."""
        if self.open is None:
            self.open = StepRow(step, epoch, lr)
            if loss_scale is not None:
                self.open.scale_before = loss_scale.detach().clone()  # update() changes it in place
        return self.open

    def add_grads(self, norms: torch.Tensor, positions: torch.Tensor, layers: torch.Tensor | None) -> None:
        self.open.norms.append(norms)
        self.open.positions.append(positions)
        if layers is not None:
            self.grad_layers = layers if self.grad_layers is None else self.grad_layers + layers

    def add_loss(self, loss: torch.Tensor) -> None:
        """A batch's loss; a per-sample loss vector (reduced by the user for backward) by its mean, on device."""
        loss = loss.detach()
        self.losses.append(loss if loss.dim() == 0 else loss.float().mean())

    def close(self, loss_scale: torch.Tensor | None) -> StepRow | None:
        """The batch ended: if an optimizer step ran in it, its row joins the pending ones (returned)."""
        row, self.open = self.open, None
        if row is None:
            return None  # accumulating: no optimizer step in this batch
        row.losses, self.losses = self.losses, []
        if row.scale_before is not None and loss_scale is not None:
            row.scale = loss_scale.detach().float().reshape(()).clone()
            row.skipped = (row.scale < row.scale_before.to(row.scale.device)).float()
        self.rows.append(row)
        return row

    @property
    def full(self) -> bool:
        return len(self.rows) >= MAX_PENDING_ROWS

    def take(self) -> tuple[list[StepRow], torch.Tensor | None]:
        """The pending rows and the per-layer gradient norms, handed to the read."""
        rows, layers = self.rows, self.grad_layers
        self.rows, self.grad_layers = [], None
        return rows, layers


def derive(rows: list[StepRow], n_params: int, device: torch.device) -> torch.Tensor:
    """The ``[rows, ROW_FIELDS]`` values of the pending steps, computed for all of them at once: a handful
    of ops on the stacked ``[rows, params]`` norm matrix in the common case (one optimizer, the same
    parameters every step), one summary per row otherwise."""
    zero = torch.zeros(len(rows), device=device)
    measured = [r for r in rows if r.norms]
    same = measured and all(
        len(r.norms) == 1 and r.positions[0] is measured[0].positions[0] for r in measured
    )
    if not measured:
        sq, count, first = zero, zero, zero - 1
    elif same and len(measured) == len(rows):
        n = torch.stack([r.norms[0] for r in rows])
        fin = torch.isfinite(n)
        count = fin.logical_not().sum(1).float()
        lowest = torch.where(fin, n_params, rows[0].positions[0]).amin(1)
        first = torch.where(lowest < n_params, lowest, -1).float()
        n64 = wide(n)  # summed in float64, as the rows are: exact for every finite norm
        sq = (n64 * n64).sum(1)
    else:  # several optimizers, or steps with different parameters: one row at a time
        per_row = []
        for r in rows:
            if r.norms:
                s_, c_, f_ = nonfinite_summary(torch.cat(r.norms), torch.cat(r.positions), n_params)
                per_row.append(torch.stack([s_, wide(c_), wide(f_)]))
            else:
                per_row.append(wide(torch.tensor([0.0, 0.0, -1.0], device=device)))
        sq, count, first = torch.stack(per_row).to(device).unbind(1)
    loss = _losses(rows, zero)
    bad = (count > 0).float()
    if any(r.scale is not None for r in rows):  # AMP with a GradScaler
        nan = zero[0] + math.nan
        scale = torch.stack([r.scale if r.scale is not None else nan for r in rows]).to(device)
        skipped = torch.stack([r.skipped if r.skipped is not None else zero[0] for r in rows]).to(device)
    else:
        scale, skipped = zero + math.nan, zero
    # float64 rows (float32 on Apple's MPS): a finite squared norm beyond float32's range stays finite
    return torch.stack([wide(t) for t in (loss, sq, count, first * bad, bad, scale, skipped)], dim=1)


def _losses(rows: list[StepRow], zero: torch.Tensor) -> torch.Tensor:
    """Each step's mean (micro-)batch loss, stacked in one op in the common case (one 0-d loss a step)."""
    first = rows[0].losses[0] if rows[0].losses else None
    if first is not None and all(
        len(r.losses) == 1 and r.losses[0].dim() == 0 and r.losses[0].dtype == first.dtype for r in rows
    ):
        return torch.stack([r.losses[0] for r in rows]).float().to(zero.device)
    if all(len(r.losses) == 1 for r in rows):
        return torch.stack([r.losses[0].float().reshape(()) for r in rows]).to(zero.device)
    return torch.stack([torch.stack(r.losses).float().mean() if r.losses else zero[0] for r in rows]).to(
        zero.device
    )
