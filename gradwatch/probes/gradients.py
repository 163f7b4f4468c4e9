"""Gradient probe: per-parameter L2 norms with ``torch._foreach_norm``, kept on device.

Runs in ``on_before_optimizer_step``: after accumulation, after AMP unscaling, before clipping.
Every step it produces three device scalars (total squared norm, non-finite count, index of the
first non-finite parameter) with no host sync. On scheduled steps it also keeps the per-layer
squared norms.

Dtypes and layouts: float32, float16 and bfloat16 gradients go through one fused float32 kernel (the
fast path). float64 and complex ones, and sparse gradients (``nn.Embedding(sparse=True)``), take
:func:`grouped_norms`: one kernel per kind, float64 norms kept in float64, complex norms real, sparse
gradients by their coalesced values.
"""

from __future__ import annotations

import math

import torch

from gradwatch.distributed import local
from gradwatch.internals import foreach_norm, foreach_norm_native
from gradwatch.probes.layout import ParamLayout

#: The dtypes whose norms the fused float32 kernel takes: the fast path, one kernel a step.
NARROW = (torch.float32, torch.float16, torch.bfloat16)


def needs_grouping(tensors: list[torch.Tensor]) -> bool:
    """Whether some tensor is not a dense float32/float16/bfloat16 one (see :func:`grouped_norms`)."""
    return any(t.dtype not in NARROW or t.layout != torch.strided for t in tensors)


def foreach_norms(tensors: list[torch.Tensor], grouped: bool = False) -> torch.Tensor:
    """L2 norm of each tensor, as one vector on the tensors' device (no host sync): float32 from one fused
    kernel, or with ``grouped`` (float64, complex or sparse tensors among them) :func:`grouped_norms`."""
    return grouped_norms(tensors) if grouped else torch.stack(foreach_norm(tensors))


def grouped_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor when the float32 kernel cannot take them all, in their order: dense
    float32/16 in float32, float64 and complex in their own precision (the norm of a complex tensor is
    real), a sparse one by its values once coalesced (duplicate indices summed, as in the dense tensor).
    Two fused kernels at most; float64 if any norm is (``stack`` promotes), else float32.

    Example:
        >>> grouped_norms([torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0], dtype=torch.float64)])
        tensor([5., 5.], dtype=torch.float64)
        >>> duplicates = torch.sparse_coo_tensor([[0, 0]], [3.0, 1.0], (2,))  # index 0 twice: 3 + 1
        >>> grouped_norms([torch.tensor([3 + 4j]), duplicates])
        tensor([5., 4.])
    """
    dense = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    narrow = [i for i, t in enumerate(dense) if t.dtype in NARROW]
    native = [i for i, t in enumerate(dense) if t.dtype not in NARROW]
    out: list[torch.Tensor | None] = [None] * len(dense)
    for group, norm in ((narrow, foreach_norm), (native, foreach_norm_native)):
        if group:
            for i, n in zip(group, norm([dense[i] for i in group]), strict=True):
                out[i] = n
    return torch.stack(out)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float64 for running sums, where the device has it (Apple's MPS has not: float32 there)."""
    return t.float() if t.device.type == "mps" else t.double()


def squared_total(norms: torch.Tensor) -> torch.Tensor:
    """The sum of squares of a norm vector as a 0-d float64 device tensor, with no host read: the
    per-step number of skip_step on the device flag and of clipping's device arithmetic. Summed in
    float64, as the rows are (``recorder.derive``), so a step is non-finite for skip_step exactly when
    it is in the rows. :func:`host_squared_total` is the same sum where the norms were read to the host
    anyway (skip_step's decision).

    Example:
        >>> float(squared_total(torch.tensor([3.0, 4.0])))
        25.0
        >>> float(squared_total(torch.tensor([1e20, 1.0], dtype=torch.float64))), float(squared_total(torch.tensor([math.nan])))
        (1e+40, nan)
    """
    n = wide(norms)
    return torch.dot(n, n)


def host_squared_total(values: list[float]) -> float:
    """:func:`squared_total` of norms already read to the host (Python floats), exact in float64. Summing
    the vector skip_step's decision reads costs no tensor op; the device ops of :func:`squared_total`
    and a scalar read instead cost about 75 us more a step inside a fit (``benchmarks/hook_times.py``,
    the CPU workload: 113 against 38 us).

    Example:
        >>> host_squared_total([3.0, 4.0]), host_squared_total([1e20, 1.0]), host_squared_total([math.nan])
        (25.0, 1e+40, nan)
    """
    return math.fsum(v * v for v in values)


def exact_overflowed(norms: torch.Tensor, grads: list[torch.Tensor], values: list[float]) -> list[float]:
    """``values`` (``norms`` read to the host) with each Inf the float32 kernel returned for a *finite*
    gradient (its squares overflow past ~1.8e19) replaced by the exact norm, computed in float64; the
    corrected norms are written back into ``norms`` (a norm up to 3.4e38 fits in float32) so the step's
    row holds them too. Runs only where a value is Inf and the gradients are at hand (skip_step's exact
    decision): a rare event, so the extra kernel costs nothing in the common case.

    Example:
        >>> g = [torch.full((4,), 1e20), torch.tensor([float("inf")])]
        >>> n = torch.stack([torch.linalg.vector_norm(t) for t in g])
        >>> exact_overflowed(n, g, n.tolist()), n.tolist()
        ([2.0000000400817547e+20, inf], [2.0000000400817547e+20, inf])
    """
    fixed = list(values)
    for i, v in enumerate(values):
        if v == math.inf:
            g = local(grads[i]).detach()
            exact = torch.linalg.vector_norm((g.coalesce().values() if g.is_sparse else g).double())
            if torch.isfinite(exact):  # sync: only for an Inf norm, already read to the host
                fixed[i] = float(exact)
                norms[i] = exact.to(norms.dtype)
    return fixed


class GradientProbe:
    """Collects gradient statistics of the parameters an optimizer owns."""

    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        #: Gradients the fused float32 kernel cannot take (float64, complex; sparse, found at the first)
        self.grouped = needs_grouping(layout.params)
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
        grads_ = [local(g) for g in grads] if sharded else grads
        try:
            norms = foreach_norms(grads_, self.grouped)
        except RuntimeError:  # a sparse gradient (nn.Embedding(sparse=True)): grouped from now on
            if self.grouped or not needs_grouping(grads_):
                raise
            self.grouped = True
            norms = foreach_norms(grads_, grouped=True)
        positions = self._indices(tuple(idx), norms.device)
        layers = None
        if per_layer:
            wide_norms = wide(norms)  # squares in float64: finite for every finite norm
            layers = torch.zeros(len(self.layout.layers), dtype=wide_norms.dtype, device=norms.device)
            layers.index_add_(0, self.layout.layer_index.to(norms.device)[positions], wide_norms.square())
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
