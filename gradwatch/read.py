"""The read: everything pending goes to the host in one transfer and comes back as :class:`Stats`.

What a read carries (each with how ranks combine it, by name): the per-step rows (``ROW_FIELDS``), the
scheduled step's per-layer gradient norms, clipping coefficients, per-layer weight norms and update
ratios (measured now, after the step), and the activation and input summaries the probes queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradwatch.distributed import MEAN, PARAM, SUM, read_alone
from gradwatch.probes import ParamLayout, fingerprint, leftover
from gradwatch.probes.activations import ActivationProbe
from gradwatch.probes.probe_set import ProbeSet
from gradwatch.recorder import StepRow, derive
from gradwatch.stats import ROW_FIELDS, ActivationStats, InputStats, Stats, StepRecord


@dataclass
class Read:
    """One read's outcome: the statistics, and the clipping coefficient of each step (or ``None``)."""

    stats: Stats
    clips: np.ndarray | None


def read(
    rows: list[StepRow],
    grad_layers: torch.Tensor | None,
    probes: ProbeSet,
    scheduled: bool,
    clipping: bool,
    val_loss: float | None,
    across_ranks: bool,
) -> Read:
    """Queue the rows (and on a ``scheduled`` step the weight statistics, measured now, after the step)
    with what the probes queued, read it all once, and build the :class:`Stats` the detectors judge.
    ``clipping``: clip_gradients ran, so each row's coefficient is read too."""
    transfer, acts = probes.take()
    layout = probes.layout
    transfer.add("rows", derive(rows, len(layout), layout.device), tuple(ROW_FIELDS.values()))
    if grad_layers is not None:
        transfer.add("grad_layers", grad_layers, PARAM)
    if clipping:
        clips = [r.clip for r in rows]  # host floats after the skip decision's read, else device scalars
        if all(isinstance(c, float) for c in clips):
            coefs = torch.tensor(clips, device=layout.device)
        else:
            coefs = torch.stack([torch.as_tensor(c, device=layout.device).float().reshape(()) for c in clips])
        transfer.add("clips", coefs, MEAN)
    if scheduled and len(layout):  # the weights as this step updated them (if the model has any)
        w_sq, w_bad, update = probes.weights.measure()
        transfer.add("weight_sq", w_sq, PARAM)
        transfer.add("weight_bad", w_bad, SUM)
        if update is not None:
            transfer.add("update", update, PARAM)
    host = transfer.read(across_ranks=across_ranks, sharded=layout.sharded)
    read_alone(not across_ranks)  # what follows this read (a rollback, a snapshot) may wait on the ranks
    stats = build_stats(rows, host, layout, acts, val_loss)
    stats.batch = fingerprint.settle(host.get("batch"), probes.epochs_counted)
    stats.leftover = leftover.settle(host.get("leftover"))
    stats.model_setup = probes.setup.settle(host)  # host-side: module modes, requires_grad, optimizers
    return Read(stats, host.get("clips"))


def build_stats(
    rows: list[StepRow],
    host: dict[str, Any],
    layout: ParamLayout,
    acts: ActivationProbe | None,
    val_loss: float | None,
) -> Stats:
    names, layers = layout.names, layout.layers
    records = []
    # Python floats, not NumPy scalars: the loop below does a dozen operations on each
    for r, (loss, gsq, count, first_x_bad, bad, scale, skipped) in zip(
        rows,
        host["rows"].tolist(),  # sync: none, a NumPy array already on the host
        strict=True,
    ):
        first_i = round(first_x_bad / bad) if bad > 0 else -1  # ranks agree under DDP: exact
        records.append(
            StepRecord(
                step=r.step,
                epoch=r.epoch,
                loss=float(loss) if r.losses else None,
                grad_norm=math.sqrt(gsq) if gsq >= 0 else math.nan,
                grad_nonfinite=math.ceil(count - 1e-3) if math.isfinite(count) else 0,
                first_nonfinite=names[first_i] if 0 <= first_i < len(names) else None,
                lr=r.lr,
                loss_scale=float(scale) if math.isfinite(scale) else None,
                scaler_skipped=bool(skipped > 0),
            )
        )
    last = rows[-1]
    stats = Stats(step=last.step, epoch=last.epoch, steps=records, val_loss=val_loss)
    if "grad_layers" in host:
        stats.grad_norm = {n: math.sqrt(v) for n, v in zip(layers, host["grad_layers"], strict=True)}
    if "weight_sq" in host:
        stats.weight_norm = {
            n: (math.nan if bad > 0 else math.sqrt(v))
            for n, v, bad in zip(layers, host["weight_sq"], host["weight_bad"], strict=True)
        }
    if "update" in host:
        upd, before = host["update"]
        stats.update_ratio = {
            n: math.sqrt(u) / math.sqrt(b) if b > 0 else math.nan
            for n, u, b in zip(layers, upd, before, strict=True)
        }
        stats.update_ratio["total"] = math.sqrt(upd.sum()) / max(math.sqrt(before.sum()), 1e-30)
    if "activations" in host and acts is not None:  # added up by module across ranks: each rank's mean
        stats.activations = {
            n: ActivationStats(k, *(float(x) for x in v)) for n, k, v in acts.settle(host["activations"])
        }
    if "inputs" in host and host["inputs"][-1] > 0:  # added up across ranks, with how many had a batch
        inputs = host["inputs"]
        stats.inputs = InputStats(*(float(x / inputs[-1]) for x in inputs[:-1]))
    return stats
