"""Batch fingerprint: a few moments of the batch's tensors on scheduled steps, to see the same batch twice.

Two batches with the same element count, sum, sum of squares and sum of squared per-sample sums in every
tensor are, for real data, the same batch (the same samples in any order): two different batches agree on
all four by chance with a probability far below one in a million, even for binary pixels or token ids.
The moments are permutation invariant on purpose, so a pipeline that reshuffles the one batch it repeats
is still seen repeating. One flag per floating tensor says whether the batch's samples are bit-identical
to the first (a loader that hands out one sample ``B`` times): :data:`COMPARED` of them, evenly spaced,
are compared, a cost of a few samples whatever the batch size.

Cost, on the batch's device and only on scheduled steps: per tensor (the first :data:`SLOTS`) a per-sample
sum and per-sample norms (two passes over its data, float32) and the equality test on a few samples,
about 20 kernel launches; integer and half tensors are copied to float32 first (a 256 x 3 x 32 x 32
float batch: ~0.2 ms on one CPU thread, against tens of ms for a small CNN's step). The same
samples give bit-identical moments: per-sample reductions are PyTorch's own (not BLAS), sorted before
they are summed, so neither memory alignment nor sample order changes a bit (tests/test_silent.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from gradwatch.stats import BatchStats

#: How many of a batch's tensors are fingerprinted, depth first (inputs, targets, a mask, ...).
SLOTS = 4
#: Per tensor: element count, sum, sum of squares, sum of squared per-sample sums, samples identical.
FIELDS = 5
#: How many samples of a batch (evenly spaced, the first included) the identical-samples test compares.
COMPARED = 8


def tensors_of(batch: Any, limit: int = SLOTS) -> list[torch.Tensor]:
    """The first ``limit`` tensors in a batch (tensor, tuple/list, or dict values), depth first.

    Example:
        >>> [t.tolist() for t in tensors_of({"x": torch.ones(2), "meta": ["a", (torch.zeros(1),)]})]
        [[1.0, 1.0], [0.0]]
    """
    out: list[torch.Tensor] = []

    def visit(item: Any) -> None:
        if len(out) >= limit:
            return
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, Mapping):
            for value in item.values():
                visit(value)
        elif isinstance(item, list | tuple):
            for value in item:
                visit(value)

    visit(batch)
    return out


def _moments(t: torch.Tensor) -> torch.Tensor | None:
    """``[numel, sum, sum of squares, sum of squared per-sample sums, identical]`` of one tensor, on its
    device, or ``None`` for what has no cheap dense view (nested tensors, an empty tensor)."""
    t = t.detach()
    if t.is_nested or t.numel() == 0:
        return None
    dense = t.layout == torch.strided
    if t.is_sparse:  # COO: its values, once coalesced (duplicate indices summed, as in the dense tensor)
        t = t.coalesce().values()
    elif not dense:  # CSR, CSC, BSR, BSC
        t = t.values()
    if t.is_complex():
        t = torch.view_as_real(t)
    x = t if t.dtype in (torch.float32, torch.float64) else t.float()
    rows = x.reshape(x.shape[0] if dense and x.dim() else 1, -1)
    # per sample (sum, squared norm), then sorted: the same samples in another order give the same bits
    per_sample = torch.stack([rows.sum(1), torch.linalg.vector_norm(rows, dim=1)]).double()
    per_sample[1].square_()
    per_sample = per_sample.sort(dim=1).values
    same = per_sample.new_zeros(1)
    if dense and t.is_floating_point() and rows.shape[0] > 1:  # bit-identical samples, on the original
        flat = t.reshape(rows.shape[0], -1)
        picked = flat[:: max(1, (len(flat) - 1) // (COMPARED - 1))]  # evenly spaced, the first included
        same = (picked == flat[:1]).all().double().reshape(1)
    sums = torch.cat([per_sample.sum(1), per_sample[0].square().sum().reshape(1)])
    return torch.cat([same.new_full((1,), x.numel()), sums, same])


def fingerprint(batch: Any, device: torch.device) -> torch.Tensor:
    """``[1, SLOTS x FIELDS moments]`` of a batch (zeros for missing tensors), float64, on the first tensor's
    device (``device`` if the batch holds none). The leading 1 counts the ranks that had a batch (ranks add
    the rows up). Tensors on another device than the first (a CPU ``lengths`` tensor) are left out: moving
    them would be a copy per scheduled step.

    Example:
        >>> a = fingerprint((torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1])), torch.device("cpu"))
        >>> [round(v, 4) for v in a[:6].tolist()]  # 1 batch; 6 elements, sum 15, squares 55, 1² + 5² + 9²
        [1.0, 6.0, 15.0, 55.0, 107.0, 0.0]
        >>> same = fingerprint(torch.ones(4, 3), torch.device("cpu"))
        >>> same[5].item()  # every sample identical
        1.0
    """
    found = tensors_of(batch)
    where = found[0].device if found else device
    one = torch.ones(1, dtype=torch.float64, device=where)
    parts = [one]
    for i in range(SLOTS):  # a fixed layout, the same on every rank (fill kernels, no copy from the host)
        t = found[i] if i < len(found) else None
        m = _moments(t) if t is not None and t.device == where else None
        parts.append(m if m is not None else one.new_zeros(FIELDS))
    return torch.cat(parts)


def settle(row: np.ndarray | None, epochs_counted: bool) -> BatchStats | None:
    """The read's fingerprint row as :class:`BatchStats` (``None``: no batch was fingerprinted).

    Example:
        >>> row = fingerprint((torch.ones(2, 3), torch.arange(2)), torch.device("cpu")).numpy()
        >>> b = settle(row, epochs_counted=True)
        >>> b.moments[1], b.identical[:2]
        ((2.0, 1.0, 1.0, 1.0), (True, False))
    """
    if row is None or not row[0] > 0:
        return None
    count, *rest = row.tolist()  # sync: none, a NumPy array already on the host
    slots = [rest[i * FIELDS : (i + 1) * FIELDS] for i in range(SLOTS)]
    moments = tuple(tuple(slot[:4]) for slot in slots)
    identical = tuple(slot[0] > 0 and slot[4] >= count for slot in slots)  # on every rank that had one
    return BatchStats(moments, identical, epochs_counted)
