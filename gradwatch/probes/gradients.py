"""Gradient probe: per-parameter L2 norms with ``torch._foreach_norm``, kept on device.

Runs in ``on_before_optimizer_step``: after accumulation, after AMP unscaling, before clipping.
Every step it produces three device scalars (total squared norm, non-finite count, index of the
first non-finite parameter) with no host sync. On scheduled steps it also keeps the per-layer
squared norms.
"""

from __future__ import annotations

import math

import torch

from gradwatch.distributed import local
from gradwatch.internals import foreach_norm
from gradwatch.probes.layout import ParamLayout


def foreach_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 vector on the tensors' device (no host sync)."""
    return torch.stack(foreach_norm(tensors))


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 for running sums, where the device has it (Apple's MPS has not: float32 there)."""
    return t.float() if t.device.type == "mps" else t.double()


#: Where float32 overflows: a float64 value at or above it rounds to Inf in float32.
FLOAT32_OVERFLOW = torch.finfo(torch.float32).max + 2.0**103


def squared_total(norms: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a norm vector as a 0-d float64 device tensor, with no host read: the
    per-step number of skip_step on the device flag and of clipping's device arithmetic. Summed in
    float64, and Inf where the float32 rows (``recorder.derive``) would overflow, so that a step is
    non-finite for skip_step exactly when it is in the rows. :func:`host_squared_total` is the same sum
    where the norms were read to the host anyway (skip_step's decision).

    Example:
        >>> float(squared_total(torch.tensor([3.0, 4.0])))
        25.0
        >>> float(squared_total(torch.tensor([1e20, 1.0]))), float(squared_total(torch.tensor([float("nan")])))
        (inf, nan)
    """
    n = wide(norms)
    sq = torch.dot(n, n)
    return torch.where(sq >= FLOAT32_OVERFLOW, math.inf, sq)


def host_squared_total(values: list[float]) -> float:
    """:func:`squared_total` of norms already read to the host (Python floats): exact in float64, Inf
    where the float32 rows overflow. Summing the vector skip_step's decision reads costs no tensor op;
    the device ops of :func:`squared_total` and a scalar read instead cost about 75 us more a step
    inside a fit (``benchmarks/hook_times.py``, the CPU workload: 113 against 38 us).

    Example:
        >>> host_squared_total([3.0, 4.0]), host_squared_total([1e20, 1.0]), host_squared_total([math.nan])
        (25.0, inf, nan)
    """
    total = math.fsum(v * v for v in values)
    return math.inf if total >= FLOAT32_OVERFLOW else total


class GradientProbe:
    """Collects gradient statistics of the parameters an optimizer owns."""

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _indices(self, idx: tuple[int, ...], device: torch.device) -> torch.Tensor:
        cached = self._index_cache.get(idx)
        if cached is None or cached.device != device:
            cached = torch.tensor(idx, dtype=torch.long, device=device)
            self._index_cache[idx] = cached
        return cached

    def measure_raw(
        self, params: list[torch.Tensor], per_layer: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]] | None:
        """The per-parameter norm vector, its positions in :class:`ParamLayout` order, (on scheduled steps)
        per-layer squared norms, and the watched gradients themselves (for clipping): two ops on a plain
        step (``_foreach_norm`` and a stack). Everything derived from the norms is computed later, for
        many steps at once, at the read."""
        grads: list[torch.Tensor] = []
        idx: list[int] = []
        index_of = self.layout.index_of
        sharded = self.layout.sharded
        for p in params:
            i = index_of.get(id(p))
            g = p.grad
            if i is not None and g is not None:
                grads.append(g)
                idx.append(i)
        if not grads:
            return None
        # sharded: each rank measures its own shards (their squares are summed at the read)
        norms = foreach_norms([local(g) for g in grads] if sharded else grads)
        positions = self._indices(tuple(idx), norms.device)
        layers = None
        if per_layer:
            layers = torch.zeros(len(self.layout.layers), dtype=norms.dtype, device=norms.device)
            layers.index_add_(0, self.layout.layer_index.to(norms.device)[positions], norms.square())
        return norms, positions, layers, grads


def nonfinite_summary(
    norms: torch.Tensor, positions: torch.Tensor, none: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum of squares, non-finite count, first non-finite position or -1)`` of a norm vector, on device.

    The hot path of every step, so it is written for few kernel launches (about eight small ops):
    ``dot`` for the sum of squares (Inf/NaN propagate as with ``square().sum()``), and the first bad
    position as the minimum of the positions where the norm is non-finite (``none``, larger than every
    position, standing for "no such position"), without a host read.

    Example:
        >>> n = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
        >>> sq, count, first = nonfinite_summary(torch.tensor([3.0, 4.0]), torch.tensor([0, 1]), 2)
        >>> float(sq), int(count), int(first)
        (25.0, 0, -1)
        >>> _, count, first = nonfinite_summary(n, torch.tensor([5, 6, 7, 8]), 9)
        >>> int(count), int(first)
        (2, 6)
    """
    fin = torch.isfinite(norms)
    count = fin.logical_not().sum()
    lowest = torch.where(fin, none, positions).amin()
    first = torch.where(lowest < none, lowest, -1)
    return squared_total(norms), count, first
