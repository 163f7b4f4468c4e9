"""Activation probe: forward hooks attached on sampled steps only, detached right after.

Which modules are watched, and how their output is read (see :class:`gradwatch.stats.ActivationStats`):

- ReLU-family modules (``nn.ReLU``, ``nn.ReLU6``): zeros and dead units.
- ``nn.Tanh``, ``nn.Sigmoid`` (and ``nn.Hardtanh``, ``nn.Hardsigmoid``): saturation.
- ``nn.Linear`` and ``nn.Conv1d/2d/3d``: their pre-activation output, so that ``F.relu``/``torch.tanh``
  in ``forward`` are covered: ``zero_frac`` is the fraction ``<= 0`` (what ReLU would zero),
  ``saturated_frac`` the fraction with ``|x| > 2.65`` (where tanh is past 0.99).
- Other activation modules (GELU, SiLU, ELU, LeakyReLU, ...): mean, std and max only.

A module called more than once in a forward gives one summary per producer (the Linear/Conv whose output
it read, :mod:`gradwatch.probes.dataflow`): ``act@fc1``, ``act@fc2``; one producer: its own name (tags kept).

Units: features of 2-D outputs ``(N, F)``, channels (dim 1) of convolutions and 4-D/5-D tensors, the
last dimension of 3-D outputs of other modules ``(N, T, F)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradwatch.internals import is_compiled
from gradwatch.probes.dataflow import NORMS, DataFlow, call_names, pass_through_modules

_RELU = (nn.ReLU, nn.ReLU6)
_TANH = (nn.Tanh, nn.Hardtanh)
_SIGMOID = (nn.Sigmoid, nn.Hardsigmoid)
_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_OTHER = (nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.PReLU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus)

#: tanh(2.65) ~= 0.990: pre-activations beyond this are on tanh's flat part.
TANH_FLAT = 2.65

#: A unit active on fewer than this fraction of the batch's samples (and positions) counts as dead
#: (SageMaker Debugger's dead-ReLU rule: active less than 1% of the time).
DEAD_RATE = 0.01

#: Fields of the per-module stats vector, in order.
FIELDS = ("mean", "std", "max_abs", "zero_frac", "dead_unit_frac", "saturated_frac")

#: The columns of a slot in :meth:`ActivationProbe.stack`: the fields, then 1 if the call ran (ranks add
#: it up: how many ran it), then its call number in the forward pass.
COUNT, CALL = len(FIELDS), len(FIELDS) + 1


def kind_of(module: nn.Module) -> str | None:
    """How gradwatch reads a module's output, or ``None`` if it is not watched."""
    if isinstance(module, _RELU):
        return "relu"
    if isinstance(module, _TANH):
        return "tanh"
    if isinstance(module, _SIGMOID):
        return "sigmoid"
    if isinstance(module, _LINEAR):
        return "linear"
    if isinstance(module, _OTHER):
        return "other"
    return None


def _unit_dim(y: torch.Tensor, conv: bool) -> int:
    if y.ndim <= 2:
        return y.ndim - 1
    if conv or y.ndim >= 4:
        return 1
    return y.ndim - 1


def _count_above(a: torch.Tensor, threshold: float) -> torch.Tensor:
    """How many elements of the non-negative ``a`` exceed ``threshold``, consumed in place.

    ``sign(relu(a - t))`` is 1 exactly where ``a > t`` (IEEE subtraction of distinct floats is never 0),
    and float passes are several times faster than a boolean comparison on CPU.
    """
    return a.sub_(threshold).relu_().sign_().sum()


def summarize(y: torch.Tensor, kind: str, conv: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The :data:`FIELDS` vector of one output tensor, and per unit the fraction of samples where it is
    active (relu/linear kinds, else ``None``), computed on its device without a host sync.

    Cost: a few float passes over ``y``. The mean is a sum, the std the norm of the centred values
    (two-pass, as stable as ``torch.std``, which is a single-threaded Welford loop on CPU and several
    times slower; ``vector_norm`` rather than ``dot``, which CUDA refuses beyond 2**31 elements),
    ``max_abs`` comes from ``aminmax``, and every count is the sum of a 0/1 float tensor (``sign`` of
    ``y`` or of ``relu(y)``; boolean comparisons are the slow path on CPU). Per-unit counts are one
    ``sum`` over the other dimensions.
    """
    y = y.detach().float()  # a no-op for float32 outputs
    n = y.numel()
    flat = y.reshape(-1)
    mean = flat.sum() / n
    zero = mean.new_zeros(())
    std = torch.linalg.vector_norm(flat - mean) / math.sqrt(n - 1) if n > 1 else zero
    lo, hi = torch.aminmax(flat)
    max_abs = torch.maximum(hi, lo.neg())
    zero_frac = dead = saturated = zero
    active = None
    if kind in ("relu", "linear"):
        # 1 where the unit is active: y != 0 after a ReLU (its output is >= 0), y > 0 before one
        on = y.sign() if kind == "relu" else torch.relu(y).sign_()
        if y.ndim >= 2:
            dim = _unit_dim(y, conv)
            per_unit = n // y.shape[dim]  # samples (and positions) per unit
            n_on = on.sum(dim=[d for d in range(y.ndim) if d != dim])  # per unit
            del on  # the forward pass is at its peak memory here: free each temporary at once
            zero_frac = 1 - n_on.sum() / n
            active = n_on / per_unit
            dead = (active < DEAD_RATE).float().mean()
        else:
            zero_frac = 1 - on.sum() / n
            del on
        # sign(NaN) is 0: a NaN output would read as "off". It is the nonfinite rule's finding, not a
        # dead or zero unit (the fractions stay 0, as NaN != 0 had them before)
        finite = mean.isfinite()
        zero_frac, dead = torch.where(finite, zero_frac, zero), torch.where(finite, dead, zero)
    if kind == "tanh":
        saturated = _count_above(flat.abs(), 0.99) / n
    elif kind == "sigmoid":  # y < 0.01 or y > 0.99
        saturated = _count_above((flat - 0.5).abs_(), 0.49) / n
    elif kind == "linear":
        saturated = _count_above(flat.abs(), TANH_FLAT) / n
    return torch.stack([mean, std, max_abs, zero_frac, dead, saturated]), active


class ActivationProbe:
    """Attach one-shot forward hooks for one sampled step; :meth:`detach` removes every one.

    ``torch.compile``: dynamo does not guard on the forward hooks of submodules
    (``torch._dynamo.config.skip_nnmodule_hook_guards``), so hooks attached and removed between steps
    would be ignored by an already compiled graph. When the model holds a compiled module
    (``OptimizedModule``), the probe therefore registers its hooks once, before the first forward is
    compiled, and gates them with a plain attribute (:attr:`sampling`) that dynamo does guard on: one graph
    with the statistics, one without, both compiled once and reused. :meth:`remove` takes them off.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[str, nn.Module, str]] = [
            (name, m, kind) for name, m in model.named_modules() if (kind := kind_of(m)) is not None
        ]
        self._handles: list[RemovableHandle] = []
        # (module, producer) -> (call number, stats, per-unit activity): one sample per pair per step
        self._captured: dict[tuple[str, str | None], tuple[int, torch.Tensor, torch.Tensor | None]] = {}
        #: Per-unit activity of relu/linear calls at the last sampled step (device vectors, never read).
        self.activity: dict[str, torch.Tensor] = {}
        self.persistent = is_compiled(model)
        #: Which Linear/Conv feeds each call (not under torch.compile: dynamo traces the hooks, and tensor
        #: identities while tracing are not the runtime ones; remedies then go by registration order).
        self.flow = None if self.persistent else DataFlow(model)
        self._passes = pass_through_modules(model) if self.flow is not None else []
        #: Every (module, producer) call a step can have, fixed at bind and the same on every rank: each
        #: module, and each activation module after each Linear/Conv (with no recorded flow: modules only).
        linear = [name for name, _, kind in self.modules if kind == "linear"]
        self.slots: list[tuple[str, str | None]] = []
        for name, _, kind in self.modules:
            self.slots.append((name, None))
            if kind != "linear" and self.flow is not None:
                self.slots += [(name, producer) for producer in linear]
        self._slot = {key: i for i, key in enumerate(self.slots)}
        self._kinds = {name: kind for name, _, kind in self.modules}
        self._order = {name: i for i, (name, _, _) in enumerate(self.modules)}
        self.sampling = False
        if self.persistent:  # before the first forward, so that dynamo traces them (gated off)
            self._register()

    @property
    def attached(self) -> bool:
        return self.sampling if self.persistent else bool(self._handles)

    def attach(self) -> None:
        self._captured.clear()
        if self.flow is not None:
            self.flow.clear()
        if self.persistent and self._handles:
            self.sampling = True
            return
        self.detach()
        self.sampling = True
        self._register()

    def _register(self) -> None:
        for name, module, kind in self.modules:
            self._handles.append(
                module.register_forward_hook(self._hook(name, kind, isinstance(module, _CONV)))
            )
        for name, module in self._passes:  # BatchNorm, Dropout, Identity: they only hand the tags on
            self._handles.append(
                module.register_forward_hook(self._pass_hook(name, isinstance(module, NORMS)))
            )

    def _hook(self, name: str, kind: str, conv: bool) -> Any:
        flow = self.flow

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.sampling:
                return
            y = output[0] if isinstance(output, tuple | list) else output
            producer, call = None, 1
            if flow is not None:
                x = args[0] if args else None
                call = flow.count(name)
                if kind == "linear":
                    flow.weighted(name, x, y)
                else:
                    producer = flow.activation(name, x, y)
            if (name, producer) in self._captured:
                return  # one sample per (module, producer) per scheduled step
            if isinstance(y, torch.Tensor) and y.is_floating_point() and y.numel() > 0:
                with torch.no_grad():
                    stats, active = summarize(y, kind, conv)
                self._captured[(name, producer)] = (call, stats, active)

        return hook

    def _pass_hook(self, name: str, norm: bool) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.sampling and args and self.flow is not None:
                self.flow.passed(name, norm, args[0], output)

        return hook

    def detach(self) -> None:
        """Stop sampling; hooks are removed (kept, gated off, for a compiled model until :meth:`remove`)."""
        self.sampling = False
        if not self.persistent:
            self.remove()

    def remove(self) -> None:  # every hook
        self.sampling = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stack(self, device: torch.device) -> torch.Tensor:
        """The calls since :meth:`attach` in the fixed layout of :attr:`slots`: a ``[slots, COUNT + 2]``
        device tensor, zero where a call did not run, so that ranks whose forward passes ran different
        modules add their statistics up slot by slot (:meth:`settle` divides by the count). Device ops
        only, on probe steps; the layout holds ``L + A * (L + 1)`` slots of 8 floats for ``L`` Linear/Conv
        and ``A`` other watched modules (a 2-layer MLP: 11; 80 transformer blocks of 7 Linear and one
        SiLU each: 45k, 1.4 MB). The captured calls wait for :meth:`settle`."""
        out = torch.zeros(len(self.slots), CALL + 1, device=device)
        keys = [key for key in self._captured if key in self._slot]
        if keys:
            rows = torch.stack([self._captured[k][1].to(device) for k in keys])
            ones = rows.new_ones(len(keys), 1)
            calls = torch.tensor([[float(self._captured[k][0])] for k in keys]).to(device, non_blocking=True)
            index = torch.tensor([self._slot[k] for k in keys]).to(device, non_blocking=True)
            out.index_copy_(0, index, torch.cat([rows, ones, calls], dim=1))
        return out

    def settle(self, host: Any) -> list[tuple[str, str, Any]]:
        """``(name, kind, FIELDS values)`` of every call that ran (on some rank), from :meth:`stack`'s
        layout as read (on the host; across ranks: added up), in module and call order: each the mean over
        the ranks that ran it. Names are made from what every rank read, so they are the same on every
        rank: a module that ran for one producer keeps its own name, else ``module@producer`` (or
        ``module#n``, its n-th call, where no producer was seen). This rank's own calls keep their per-unit
        activity (for remedies) and data flow under those names."""
        count = host[:, COUNT]
        ran = [int(i) for i in count.nonzero()[0]]
        calls = {i: round(float(host[i, CALL] / count[i])) for i in ran}
        ran.sort(key=lambda i: (self._order[self.slots[i][0]], calls[i]))
        names = call_names([(*self.slots[i], calls[i]) for i in ran])
        named = dict(zip((self.slots[i] for i in ran), names, strict=True))
        mine = {key: named[key] for key in self._captured if key in named}
        for key, name in mine.items():
            active = self._captured[key][2]
            if active is not None:
                self.activity[name] = active  # kept on device for remedies (reinitialize)
        if self.flow is not None:
            linear = {name for name, _, kind in self.modules if kind == "linear"}
            self.flow.settle(mine, linear)
        self._captured.clear()
        module = [self.slots[i][0] for i in ran]
        return [
            (name, self._kinds[m], host[i, :COUNT] / count[i])
            for name, m, i in zip(names, module, ran, strict=True)
        ]

    def collect(self) -> tuple[list[str], list[str], torch.Tensor | None]:
        """``(names, kinds, stats[M, len(FIELDS)])`` of this rank's calls since :meth:`attach`, in module
        and call order (:meth:`stack` then :meth:`settle`, without the other ranks).

        A module called for several producers has one entry per producer (``act@fc1``, ... as above).
        """
        first = next(iter(self._captured.values()), None)
        device = first[1].device if first is not None else torch.device("cpu")
        dense = self.stack(device)
        settled = self.settle(dense.cpu().numpy())  # sync: not on the hot path (the read settles its own)
        if not settled:
            return [], [], None
        values = torch.tensor(np.stack([v for _, _, v in settled]), dtype=dense.dtype, device=device)
        return [n for n, _, _ in settled], [k for _, k, _ in settled], values
