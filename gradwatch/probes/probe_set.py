"""The probes of one bound model, and what they queued for the next read.

Gradient norms every measured step; on probe steps (see ``gradwatch/cadence.py``) the activation hooks,
the input range and the weight copy behind update ratios. Everything stays on the device: the summaries
go on a :class:`~gradwatch.stats.Transfer` that the read takes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradwatch.distributed import SUM
from gradwatch.probes.activations import ActivationProbe
from gradwatch.probes.fingerprint import fingerprint
from gradwatch.probes.gradients import GradientProbe
from gradwatch.probes.inputs import input_stats
from gradwatch.probes.layout import ParamLayout
from gradwatch.probes.leftover import LeftoverProbe
from gradwatch.probes.model_setup import ModelSetupProbe
from gradwatch.probes.weights import WeightProbe
from gradwatch.stats import Transfer

log = logging.getLogger("gradwatch")


class ProbeSet:
    """``activations`` / ``inputs``: whether those heavy probes run at all; ``optimizers``: returns the
    run's optimizers, for the setup checks (``None``: not known)."""

    def __init__(
        self, model: nn.Module, activations: bool, inputs: bool, optimizers: Callable[[], list] | None = None
    ) -> None:
        self.layout = ParamLayout(model)
        self.grads = GradientProbe(self.layout)
        self.weights = WeightProbe(self.layout)
        self.setup = ModelSetupProbe(model, self.layout, optimizers)  # modes, frozen layers, optimizers
        self.acts = ActivationProbe(model) if activations else None
        self.leftover = LeftoverProbe()  # on scheduled steps: is a gradient left over from the last step?
        self.epochs_counted = True  # the loop says where epochs start (a Watch loop: if it passes epoch=)
        self._note_unmeasured(model)
        self.inputs = inputs
        self._transfer = Transfer()
        self._acts_queued = False  # the activation summaries in the queue wait for the read to name them
        self._probed_step: int | None = None

    def _note_unmeasured(self, model: nn.Module) -> None:
        """What the probes cannot measure on this model, in one log line a run (built once per run)."""
        parts = []
        if not self.layout.params:  # a frozen model, the optimizer training its input (adversarial examples)
            parts.append(
                f"gradient and weight norms, update ratios ({type(model).__name__} has no trainable "
                "parameters: the optimizer trains tensors outside it; the gradient norm reads 0)"
            )
        modules = self.acts.modules if self.acts is not None else []
        cplx = [n for n, m, _ in modules if any(p.is_complex() for p in m.parameters(recurse=False))]
        if cplx:  # their outputs are complex: zero, dead and saturated fractions are for real values
            parts.append(
                f"the activations of complex module(s) {', '.join(cplx[:3])}{', ...' * (len(cplx) > 3)}"
            )
        if parts:
            log.info(
                "gradwatch: not measured in this run: %s. The rest is measured as usual.", "; ".join(parts)
            )

    def names(self, per_layer: bool) -> dict[str, Any]:
        """What sinks may lay out by name (TensorBoard's per-block charts; per-layer tags need per_layer)."""
        modules = [n for n, _, _ in self.acts.modules] if self.acts is not None else []
        return {"layers": list(self.layout.layers), "per_layer": per_layer, "modules": modules}

    @property
    def hooks_attached(self) -> bool:
        return self.acts is not None and self.acts.attached

    def measure_grads(
        self, params: list[torch.Tensor], per_layer: bool, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]] | None:
        """The gradient probe's ``measure_raw``; ``scale``: gradients still multiplied by a GradScaler's
        scale (an optimizer that unscales inside ``step``), divided out of the norms on device."""
        self.leftover.choose(params)  # once: the parameters it watches
        measured = self.grads.measure_raw(params, per_layer=per_layer)
        if measured is None or scale is None:
            return measured
        norms, positions, layers, grads = measured
        inv = scale.detach().float().reciprocal()  # ||g / s|| = ||g|| * (1/s)
        return norms * inv, positions, layers * inv.square() if layers is not None else None, grads

    def start(self, step: int, batch: Any, heavy: bool = True, epochs_counted: bool = True) -> None:
        """A scheduled step's batch starts (once a step): open the leftover-gradient window and queue the
        batch's fingerprint; on a probe step (``heavy``) also attach the activation hooks and queue the
        input range. ``epochs_counted``: the loop says where its epochs start."""
        if self._probed_step == step:
            return
        self._probed_step = step
        self.setup.capture()  # the modes this training batch runs in (a later read may come at validation)
        self.leftover.arm()
        if self.inputs:  # the same layout on every rank (ranks add the rows up, with a count)
            self._transfer.add("batch", fingerprint(batch, self.layout.device), SUM)
            self.epochs_counted = epochs_counted
        if not heavy:
            return
        if self.acts is not None:
            self.acts.attach()
        if self.inputs:  # [mean, std, max|x|, 1], or zeros for a batch without a floating tensor: every
            # rank queues the same (ranks add them up; the read divides by how many had one)
            stats = input_stats(batch)
            if stats is None:
                row = torch.zeros(4, device=self.layout.device)
            else:
                row = torch.cat([stats, stats.new_ones(1)])
            self._transfer.add("inputs", row, SUM)

    def end(self) -> None:
        """A batch ended: detach the activation hooks, queue what they saw in the layout every rank shares
        (:meth:`ActivationProbe.stack`: ranks add each module's summaries up by name, with a count), and
        close the leftover-gradient window (its row: every rank opened it on the same step)."""
        if self.leftover.armed:
            self._transfer.add("leftover", self.leftover.take(self.layout.device), SUM)
        if self.acts is None or not self.acts.attached:
            return
        self.acts.detach()
        self._transfer.add("activations", self.acts.stack(self.layout.device), SUM)
        self._acts_queued = True

    def take(self) -> tuple[Transfer, ActivationProbe | None]:
        """What the probes queued, for the read, and the activation probe that names what it queued
        (``None`` if nothing); the queue starts anew."""
        transfer, acts = self._transfer, self.acts if self._acts_queued else None
        self._transfer, self._acts_queued = Transfer(), False
        self.setup.queue(transfer)  # BatchNorm running statistics, with every read
        return transfer, acts

    def unit_activity(self, module: str | None) -> torch.Tensor | None:
        """Per-unit activity of ``module`` at the last sampled step (device vector), for remedies."""
        return self.acts.activity.get(module) if self.acts is not None and module else None

    def remove(self) -> None:
        """Every hook off, the weight copy dropped."""
        if self.acts is not None:
            self.acts.remove()
        self.weights.discard()
        self.leftover.forget()
        self._transfer, self._acts_queued, self._probed_step = Transfer(), False, None
