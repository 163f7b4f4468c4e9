"""Weight probe: per-layer weight norms, non-finite weights, and update-to-weight ratios.

The update ratio ``||w_after - w_before|| / ||w_before||`` needs the weights before the step; they
are copied only on scheduled steps (one copy of the trainable parameters, freed right after).
"""

from __future__ import annotations

import torch

from gradwatch.distributed import local
from gradwatch.probes.gradients import foreach_norms
from gradwatch.probes.layout import ParamLayout


class WeightProbe:
    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self._before: list[torch.Tensor] | None = None

    def snapshot(self) -> None:
        """Copy the weights before the optimizer step (scheduled steps only)."""
        with torch.no_grad():
            self._before = torch._foreach_mul([local(p.detach()) for p in self.layout.params], 1.0)

    def measure(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(sq_per_layer, nonfinite_per_layer, update_sq_per_layer_or_None)`` as device tensors."""
        with torch.no_grad():
            params = [local(p.detach()) for p in self.layout.params]  # sharded: this rank's shards
            norms = foreach_norms(params)
            bad = (~torch.isfinite(norms)).to(torch.float32)
            update = None
            if self._before is not None:
                delta = torch._foreach_sub(params, self._before)
                update = self.layout.per_layer(foreach_norms(delta).square())
                before = self.layout.per_layer(foreach_norms(self._before).square())
                update = torch.stack([update, before])
                self._before = None
            return self.layout.per_layer(norms.square()), self.layout.per_layer(bad), update

    def discard(self) -> None:
        self._before = None
