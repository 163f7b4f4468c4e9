"""Weight probe: per-layer weight norms, non-finite weights, and update-to-weight ratios.

The update ratio ``||w_after - w_before|| / ||w_before||`` needs the weights before the step; they
are copied only on probe steps (one copy of the trainable parameters, freed right after the read).
"""

from __future__ import annotations

import torch

from gradwatch.distributed import local
from gradwatch.internals import foreach_copy, foreach_sub
from gradwatch.probes.gradients import foreach_norms, needs_grouping, wide
from gradwatch.probes.layout import ParamLayout


class WeightProbe:
    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self.grouped = needs_grouping(layout.params)  # float64 or complex weights
        self._before: list[torch.Tensor] | None = None

    def _params(self) -> list[torch.Tensor]:
        """The parameters as the probes read them, under ``no_grad`` (so no ``detach`` per parameter):
        this rank's local shards when sharded."""
        params = self.layout.params
        return [local(p) for p in params] if self.layout.sharded else params

    def snapshot(self) -> None:
        """Copy the weights before the optimizer step (probe steps only)."""
        if not self.layout.params:
            return  # nothing trainable in the model (the optimizer trains tensors outside it)
        with torch.no_grad():
            self._before = foreach_copy(self._params())

    def measure(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(sq_per_layer, nonfinite_per_layer, update_sq_per_layer_or_None)`` as device tensors; the
        last is ``[update, before]`` stacked. One per-layer reduction for all of them."""
        with torch.no_grad():
            params = self._params()
            norms = foreach_norms(params, self.grouped)
            before, self._before = self._before, None
            # squares summed per layer in float64 (one rounding to float32 at the read)
            rows = [wide(norms).square(), wide(torch.isfinite(norms).logical_not())]
            if before is not None:
                delta = foreach_sub(params, before)
                rows += [wide(foreach_norms(d, self.grouped)).square() for d in (delta, before)]
            per = self.layout.per_layer(torch.stack(rows))
            return per[0], per[1], (per[2:] if len(rows) > 2 else None)

    def discard(self) -> None:
        self._before = None
