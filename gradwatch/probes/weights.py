"""Weight probe: per-layer weight norms, non-finite weights, and update-to-weight ratios.

The update ratio ``||w_after - w_before|| / ||w_before||`` needs the weights before the step; they
are copied only on probe steps (one copy of the trainable parameters, freed right after the read).
"""

from __future__ import annotations

import math

import torch

from gradwatch.distributed import local
from gradwatch.probes.gradients import foreach_norms
from gradwatch.probes.layout import ParamLayout


class WeightProbe:
    def __init__(self, layout: ParamLayout) -> None:
        self.layout = layout
        self._before: list[torch.Tensor] | None = None

    def _params(self) -> list[torch.Tensor]:
        """The parameters as the probes read them, under ``no_grad`` (so no ``detach`` per parameter):
        this rank's local shards when sharded."""
        params = self.layout.params
        return [local(p) for p in params] if self.layout.sharded else params

    def snapshot(self) -> None:
        """Copy the weights before the optimizer step (probe steps only)."""
        with torch.no_grad():
            self._before = torch._foreach_mul(self._params(), 1.0)

    def measure(self, on_host: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(sq_per_layer, nonfinite_per_layer, update_sq_per_layer_or_None)`` as device tensors; the
        last is ``[update, before]`` stacked. One per-layer reduction for all of them: device ops, or on
        the CPU (``on_host=None``: as the weights' device says) Python floats."""
        with torch.no_grad():
            params = self._params()
            norms = foreach_norms(params)
            before, self._before = self._before, None
            if (
                on_host if on_host is not None else norms.device.type == "cpu"
            ):  # host memory already: Python floats, one tensor at the end
                return self._measure_host(norms, params, before)
            rows = [norms.square(), torch.isfinite(norms).logical_not().to(norms.dtype)]
            if before is not None:
                delta = torch._foreach_sub(params, before)
                rows += [foreach_norms(delta).square(), foreach_norms(before).square()]
            per = self.layout.per_layer(torch.stack(rows))
            return per[0], per[1], (per[2:] if len(rows) > 2 else None)

    def _measure_host(
        self, norms: torch.Tensor, params: list[torch.Tensor], before: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`measure` on the CPU: the norms read with ``tolist()`` (no wait there) and summed per layer
        in Python, which costs less than the five small tensor ops it replaces. Squares beyond float32's
        range become Inf in the returned tensor, as on the device."""
        values = norms.tolist()  # sync: none, CPU tensors only
        rows = [[v * v for v in values], [0.0 if math.isfinite(v) else 1.0 for v in values]]
        if before is not None:
            delta = torch._foreach_sub(params, before)
            for vectors in (delta, before):
                rows.append([v * v for v in foreach_norms(vectors).tolist()])  # sync: none (CPU)
        per = torch.tensor(self.layout.per_layer_host(rows), dtype=torch.float32)
        return per[0], per[1], (per[2:] if len(rows) > 2 else None)

    def discard(self) -> None:
        self._before = None
