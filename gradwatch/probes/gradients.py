"""Gradient probe: per-parameter L2 norms with ``torch._foreach_norm``, kept on device.

Runs in ``on_before_optimizer_step``: after accumulation, after AMP unscaling, before clipping.
Every step it produces three device scalars (total squared norm, non-finite count, index of the
first non-finite parameter) with no host sync. On scheduled steps it also keeps the per-layer
squared norms.
"""

from __future__ import annotations

import torch

from gradwatch.distributed import local
from gradwatch.probes.layout import ParamLayout


def foreach_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 vector on the tensors' device (no host sync)."""
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


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

    def measure(
        self, params: list[torch.Tensor], per_layer: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Gradient statistics of ``params`` (those that gradwatch watches and that have a gradient).

        Returns:
            ``(sq_total, nonfinite_count, first_nonfinite_index, sq_per_layer)`` as device tensors, where
            ``first_nonfinite_index`` is the position in :class:`ParamLayout` order or -1, and
            ``sq_per_layer`` is ``None`` unless ``per_layer``. ``None`` when no parameter has a gradient.
        """
        grads: list[torch.Tensor] = []
        idx: list[int] = []
        index_of = self.layout.index_of
        for p in params:
            i = index_of.get(id(p))
            if i is not None and p.grad is not None:
                grads.append(local(p.grad))  # a sharded gradient: this rank's shard (summed at the read)
                idx.append(i)
        if not grads:
            return None
        device = grads[0].device
        norms = foreach_norms(grads)
        bad = ~torch.isfinite(norms)
        sq = norms.square()
        count = bad.sum()
        positions = self._indices(tuple(idx), device)
        # argmax of a 0/1 vector is its first 1; index_select keeps it on device (a tensor index would sync)
        first = torch.where(
            count > 0, positions.index_select(0, bad.to(torch.float32).argmax().reshape(1))[0], -1
        )
        layers = None
        if per_layer:
            layers = torch.zeros(len(self.layout.layers), dtype=sq.dtype, device=device)
            layers.index_add_(0, self.layout.layer_index.to(device)[positions], sq)
        return sq.sum(), count, first, layers
