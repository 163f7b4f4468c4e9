"""The statistics detectors judge, and the one-transfer reader that brings them to the host.

Probes produce device tensors. :class:`Transfer` concatenates every tensor gathered for a scheduled
step into one flat float vector and reads it back with a single ``.cpu()`` — one host sync per
scheduled step however many layers the model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gradwatch import distributed


@dataclass
class StepRecord:
    """Per-optimizer-step values, recorded on device every step and read back at the next scheduled step.

    Attributes:
        step: optimizer step (``trainer.global_step`` during the step).
        epoch: epoch of the step.
        loss: mean training loss over the step's (micro-)batches, or ``None`` if the step returned none.
        grad_norm: total L2 norm of all gradients seen at this step (unscaled, before clipping).
        grad_nonfinite: number of parameters whose gradient holds a NaN or Inf.
        first_nonfinite: the first parameter (in ``named_parameters`` order) with a non-finite gradient.
        lr: learning rate of the first parameter group of the first optimizer.
        loss_scale: the AMP loss scale after the step (fp16 with a GradScaler), else ``None``.
        scaler_skipped: the GradScaler found an Inf/NaN gradient, skipped the optimizer step and lowered
            the scale (its normal calibration; gradients of such a step are non-finite by design).
    """

    step: int
    epoch: int
    loss: float | None
    grad_norm: float
    grad_nonfinite: int
    first_nonfinite: str | None
    lr: float | None
    loss_scale: float | None = None
    scaler_skipped: bool = False


#: The per-step row the recorder derives for every optimizer step, each field with how ranks combine it
#: (see gradwatch.distributed): sufficient statistics that add up across ranks. ``first_x_bad`` is the
#: first non-finite parameter's position where ``bad`` is 1, else 0; ``skipped`` the GradScaler's skip.
ROW_FIELDS: dict[str, str] = {
    "loss": distributed.MEAN,
    "grad_sq": distributed.PARAM,
    "nonfinite": distributed.PARAM,
    "first_x_bad": distributed.SUM,
    "bad": distributed.SUM,
    "loss_scale": distributed.MEAN,
    "skipped": distributed.SUM,
}


@dataclass
class ActivationStats:
    """Summary of one module's output on a sampled step.

    ``kind`` says how to read ``zero_frac`` and ``saturated_frac``:

    - ``"relu"`` (ReLU, ReLU6): ``zero_frac`` is the fraction of exact zeros; ``dead_unit_frac`` the
      fraction of units (features/channels) that are non-zero on fewer than 1% of the batch's samples
      (and positions, for convolutions).
    - ``"tanh"`` / ``"sigmoid"``: ``saturated_frac`` is the fraction with ``|y| > 0.99`` (tanh) or
      ``y < 0.01 or y > 0.99`` (sigmoid).
    - ``"linear"`` (Linear, Conv): pre-activations. ``zero_frac`` is the fraction ``<= 0`` (what a
      following ``F.relu`` would zero), ``dead_unit_frac`` the units ``> 0`` on fewer than 1% of samples, and
      ``saturated_frac`` the fraction with ``|x| > 2.65`` (where a following ``tanh`` is past 0.99).
    - ``"other"`` (GELU, SiLU, ...): mean, std and max only.
    """

    kind: str
    mean: float
    std: float
    max_abs: float
    zero_frac: float
    dead_unit_frac: float
    saturated_frac: float


@dataclass
class BatchStats:
    """The scheduled step's batch fingerprint (``gradwatch/probes/fingerprint.py``).

    Attributes:
        moments: per tensor of the batch (the first four, depth first; zeros where there is none): element
            count, sum, sum of squares, sum of squared per-sample sums (added up across ranks).
        identical: per tensor, whether the samples compared all equal the first (floating tensors only).
        epochs_counted: the loop says where its epochs start (always under the Trainer; a ``Watch`` loop
            when it passes ``epoch=``).
    """

    moments: tuple[tuple[float, ...], ...]
    identical: tuple[bool, ...]
    epochs_counted: bool = True


@dataclass
class LeftoverStats:
    """The scheduled step's watched gradients (``gradwatch/probes/leftover.py``), added up across ranks.

    Attributes:
        watched: parameters watched; ``fired``: of those, how many got a gradient in the window.
        stale: of those, how many found a gradient left over from earlier steps at every arrival.
        held_norm: the norm of the gradients already held at the first arrival (of the stale ones).
        new_norm: the norm of the gradients that arrived then.
    """

    watched: int
    fired: int
    stale: int
    held_norm: float
    new_norm: float


@dataclass
class InputStats:
    """Mean, standard deviation and max ``|x|`` of the first floating tensor of a sampled batch."""

    mean: float
    std: float
    max_abs: float


@dataclass
class ModelSetup:
    """How the model is set up for training at a read (``gradwatch/probes/model_setup.py``): module modes,
    ``requires_grad`` flags and which parameters the optimizers hold are Python attributes, read on the
    host for free; BatchNorm running statistics ride along on the read's one transfer.

    Attributes:
        eval_regions: modules in eval mode while the model trains, by the module ``.eval()`` was called on
            (the highest one in eval mode; ``""``: the whole model) -> its Dropout / BatchNorm modules that
            act as at inference (``"name (Class)"``). Modules frozen on purpose are left out.
        running_stats: norm layers in training mode that keep running statistics -> (``num_batches_tracked``,
            ``||running_mean|| + ||running_var||``), read with the rest.
        frozen_layers: layers whose parameters are all ``requires_grad=False`` now (frozen on purpose).
        unheld_layers: layers none of whose trainable parameters an optimizer holds -> whether the layer's
            module is in eval mode (empty when the optimizers are not known).
        unoptimized: parameters with ``requires_grad=True`` that no optimizer holds -> (layer, elements,
            its module is in eval mode, it has a gradient now).
        foreign: (tensors, elements) the optimizers hold that are parameters of no module of the model and
            get no gradient (an optimizer built from another model instance, or before a module was replaced).
    """

    eval_regions: dict[str, list[str]] = field(default_factory=dict)
    running_stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    frozen_layers: list[str] = field(default_factory=list)
    unheld_layers: dict[str, bool] = field(default_factory=dict)
    unoptimized: dict[str, tuple[str, int, bool, bool]] = field(default_factory=dict)
    foreign: tuple[int, int] = (0, 0)


@dataclass
class Stats:
    """Everything gradwatch knows at a scheduled step; what ``Detector.check`` receives.

    Attributes:
        step: the scheduled step these statistics were read at.
        epoch: its epoch.
        steps: one :class:`StepRecord` per optimizer step since the previous read, oldest first.
        grad_norm: per-layer gradient L2 norm at the scheduled step (layer = module name).
        weight_norm: per-layer weight L2 norm after the scheduled step's update.
        update_ratio: per-layer ``||w_after - w_before|| / ||w_before||`` of the scheduled step.
        activations: per-module :class:`ActivationStats` of the scheduled step's forward pass.
        inputs: :class:`InputStats` of the scheduled step's batch.
        batch: :class:`BatchStats`, the scheduled step's batch fingerprint.
        leftover: :class:`LeftoverStats`, gradients left over from earlier steps.
        val_loss: the validation loss of the latest validation run, if one was logged since the last read.
        model_setup: :class:`ModelSetup` at this read (module modes, frozen layers, optimizer membership).
    """

    step: int
    epoch: int
    steps: list[StepRecord] = field(default_factory=list)
    grad_norm: dict[str, float] = field(default_factory=dict)
    weight_norm: dict[str, float] = field(default_factory=dict)
    update_ratio: dict[str, float] = field(default_factory=dict)
    activations: dict[str, ActivationStats] = field(default_factory=dict)
    inputs: InputStats | None = None
    batch: BatchStats | None = None
    leftover: LeftoverStats | None = None
    val_loss: float | None = None
    model_setup: ModelSetup | None = None


class Transfer:
    """Gathers named device tensors and reads them all to the host in one stacked copy.

    Example:
        >>> t = Transfer()
        >>> t.add("a", torch.tensor(1.5))
        >>> t.add("b", torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> out = t.read()
        >>> float(out["a"]), out["b"].tolist()
        (1.5, [[1.0, 2.0], [3.0, 4.0]])
    """

    def __init__(self) -> None:
        self._names: list[str] = []
        self._tensors: list[torch.Tensor] = []
        self._modes: list[tuple[str, ...]] = []

    def add(self, name: str, tensor: torch.Tensor, reduce: str | tuple[str, ...] = "mean") -> None:
        """Queue ``tensor`` for the next read.

        ``reduce`` says how ranks combine it under ``torch.distributed`` (see :mod:`gradwatch.distributed`):
        ``"mean"``, ``"sum"`` or ``"param"`` for the whole tensor, or a tuple with one mode per element of
        its last dimension (e.g. ``tuple(ROW_FIELDS.values())`` for the per-step rows).
        """
        self._names.append(name)
        self._tensors.append(tensor.detach())
        self._modes.append((reduce,) if isinstance(reduce, str) else tuple(reduce))

    def __len__(self) -> int:
        return len(self._tensors)

    def read(self, across_ranks: bool = True, sharded: bool = False) -> dict[str, np.ndarray]:
        """Concatenate, copy to host once, and split back into arrays of the original shapes.

        Under ``torch.distributed`` (``across_ranks``) the vector is first all-reduced once, each element
        averaged or added up as its ``reduce`` mode says (``"param"``: added up when the parameters are
        ``sharded``, else averaged).
        """
        if not self._tensors:
            return {}
        device = self._tensors[0].device
        world = distributed.world_size()
        dtype = torch.float32 if device.type == "mps" else torch.float64  # exact rows (squared norms)
        flat = torch.cat([t.reshape(-1).to(device=device, dtype=dtype) for t in self._tensors])
        if world > 1 and across_ranks:  # one stacked all-reduce: every rank then judges the same numbers
            specs = [(t.numel(), m) for t, m in zip(self._tensors, self._modes, strict=True)]
            factors = distributed.reduce_factors(specs, world, sharded)
            flat = distributed.all_reduce_stacked(flat, factors)
        host = flat.cpu().numpy()  # sync: the one host read per scheduled step (on a CPU: none)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, tensor in zip(self._names, self._tensors, strict=True):
            n = tensor.numel()
            out[name] = host[offset : offset + n].reshape(tensor.shape)
            offset += n
        self._clear()
        return out

    def _clear(self) -> None:
        """Empty the queue once it has been read."""
        self._names.clear()
        self._tensors.clear()
        self._modes.clear()
