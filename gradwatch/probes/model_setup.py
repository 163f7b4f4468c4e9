"""How the model is set up for training: module modes, frozen layers, what the optimizers hold.

Read at every read, for the ``eval_mode_training``, ``unoptimized_parameters`` and ``frozen_weights``
rules. ``module.training``, ``p.requires_grad``, ``p.grad is None`` and object identity are Python
attributes: reading them costs no sync (measured on CPU for 500 modules, 400 parameters: 0.2 ms a read;
1.5 ms at a read where the optimizers' tensors changed, when who holds what is worked out again). The one
device quantity, each BatchNorm's running-statistics counter and the norms of its running mean and
variance, is queued on the read's transfer (a fused norm kernel and two stacks, no read of its own: 0.6 ms
on CPU for 100 BatchNorm layers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from gradwatch.probes.gradients import foreach_norms, needs_grouping
from gradwatch.probes.layout import ParamLayout, layer_of
from gradwatch.stats import ModelSetup, Transfer

#: Modules that act differently in eval mode when they have something to do (p > 0, running statistics).
DROPOUT = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


def mode_dependent(module: nn.Module) -> bool:
    """Whether ``module`` computes something else in eval mode: dropout with p > 0, a norm layer that
    keeps running statistics (``track_running_stats=False`` uses the batch's statistics in both modes)."""
    if isinstance(module, DROPOUT):
        return module.p > 0
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return isinstance(module, NORMS) and tracks_stats(module)


def tracks_stats(module: nn.Module) -> bool:
    return (
        bool(getattr(module, "track_running_stats", False))
        and getattr(module, "running_mean", None) is not None
    )


class ModelSetupProbe:
    """``optimizers``: returns the run's optimizers (``None``: not known, the optimizer checks are off)."""

    def __init__(
        self, model: nn.Module, layout: ParamLayout, optimizers: Callable[[], list[Any]] | None
    ) -> None:
        self.model, self.layout, self.optimizers = model, layout, optimizers
        named = dict(model.named_modules())
        #: mode-dependent modules, each with its ancestors (the root first): who may have called .eval()
        self.watched = [
            (name, m, [(a, named[a]) for a in _ancestors(name) if a in named])
            for name, m in named.items()
            if mode_dependent(m)
        ]
        self._queued: list[str] = []  # the norms whose statistics the pending transfer carries
        self._by_layer: dict[str, list[torch.Tensor]] = {}
        for name, p in zip(layout.names, layout.params, strict=True):
            self._by_layer.setdefault(layer_of(name), []).append(p)
        self._view: tuple[dict, dict, list] = ({}, {}, [])
        self._view_key: tuple[int, int, int] | None = None
        #: module modes as a training batch saw them (:meth:`capture`): a read that comes at a validation
        #: or a checkpoint, with the model put in eval by the loop, judges the modes it trained in
        self._modes: dict[int, bool] = {}

    def capture(self) -> None:
        """A scheduled step's training batch starts: note the modes its forward runs in."""
        self._modes = {id(m): m.training for m in self.model.modules()}

    def _training(self, m: nn.Module) -> bool:
        return self._modes.get(id(m), m.training)

    # ------------------------------------------------------------------ device: with the read
    def queue(self, transfer: Transfer) -> None:
        """Queue the running statistics of the norm layers in training mode (ranks average them)."""
        live = [
            (n, m)
            for n, m, _ in self.watched
            if isinstance(m, NORMS) and self._training(m) and tracks_stats(m)
        ]
        live = [(n, m) for n, m in live if m.num_batches_tracked is not None]
        self._queued = [n for n, _ in live]
        if not live:
            return
        device = self.layout.device
        with torch.no_grad():
            buffers = [m.running_mean for _, m in live] + [m.running_var for _, m in live]
            norms = foreach_norms(buffers, needs_grouping(buffers)).to(device)
            tracked = [m.num_batches_tracked for _, m in live]
            if any(t.device != device for t in tracked):  # a model split over devices
                tracked = [t.to(device) for t in tracked]
            counts = torch.stack(tracked).to(norms.dtype)
            transfer.add("running_stats", torch.stack([counts, norms[: len(live)] + norms[len(live) :]]))

    # ------------------------------------------------------------------ host: at the read
    def settle(self, host: dict[str, Any]) -> ModelSetup:
        """The setup at this read; ``host``: what the read brought back."""
        held = self._held()
        setup = ModelSetup(eval_regions=self._eval_regions(held))
        values = host.get("running_stats")
        if values is not None and self._queued:
            counts, norms = values.tolist()  # sync: none, a NumPy array already on the host
            setup.running_stats = {n: (c, v) for n, c, v in zip(self._queued, counts, norms, strict=True)}
        self._queued = []
        setup.frozen_layers = [
            la for la, ps in self._by_layer.items() if not any(p.requires_grad for p in ps)
        ]
        if held is not None:
            self._optimizer_view(setup, held)
        return setup

    def _held(self) -> dict[int, torch.Tensor] | None:
        """Every tensor the optimizers hold, by identity; ``None`` where the optimizers are not known."""
        if self.optimizers is None:
            return None
        held = {id(p): p for opt in self.optimizers() for g in opt.param_groups for p in g["params"]}
        return held or None  # no optimizer (Lightning's configure_optimizers returned None): no judgement

    def _optimizer_view(self, setup: ModelSetup, held: dict[int, torch.Tensor]) -> None:
        """Trainable parameters no optimizer holds, layers none of whose parameters it holds, and tensors
        the optimizers hold that are no parameter of the model and get no gradient. Who holds what is
        worked out at the first read and again when the optimizers' groups or the trainable set change
        (a walk over every module's parameters: ~1 ms for 500 modules); each read then looks at the few
        parameters it found (their gradient, their module's mode)."""
        key = (len(held), sum(held), sum(p.requires_grad for p in self.layout.params))  # held: by id
        if key != self._view_key:
            self._view, self._view_key = self._find_unheld(held), key
        unheld, layers, foreign = self._view
        for name, (p, module, layer) in unheld.items():
            setup.unoptimized[name] = (layer, p.numel(), not self._training(module), p.grad is not None)
        setup.unheld_layers = {layer: not self._training(module) for layer, module in layers.items()}
        stale = [p for p in foreign if p.grad is None]
        setup.foreign = (len(stale), sum(p.numel() for p in stale))

    def _find_unheld(self, held: dict[int, torch.Tensor]) -> tuple[dict, dict, list]:
        unheld: dict[str, tuple[torch.Tensor, nn.Module, str]] = {}
        layers: dict[str, tuple[nn.Module, list[bool]]] = {}
        own: set[int] = set()
        for module_name, module in self.model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                own.add(id(p))
                if not p.requires_grad:
                    continue
                name = f"{module_name}.{pname}" if module_name else pname
                layer = layer_of(name)
                layers.setdefault(layer, (module, []))[1].append(id(p) in held)
                if id(p) not in held:
                    unheld[name] = (p, module, layer)
        unheld_layers = {la: module for la, (module, flags) in layers.items() if not any(flags)}
        foreign = [p for i, p in held.items() if i not in own and isinstance(p, nn.Parameter)]
        return unheld, unheld_layers, foreign

    def _eval_regions(self, held: dict[int, torch.Tensor] | None) -> dict[str, list[str]]:
        """Mode-dependent modules in eval mode, by the highest module in eval mode above them, leaving out
        the deliberate cases: a module put in eval alone (its parent trains: a BatchNorm's statistics frozen
        on purpose, the ``norm_eval`` recipe), a norm layer whose own parameters are frozen or held by no
        optimizer, and a region none of whose parameters is trained (a frozen backbone in eval mode)."""
        regions: dict[str, list[str]] = {}
        trained: dict[int, bool] = {}  # per region root, once a read
        for name, m, ancestors in self.watched:
            if self._training(m):
                continue
            root_name, root = name, m
            for a_name, a in reversed(ancestors):  # up from the parent, while in eval mode
                if self._training(a):
                    break
                root_name, root = a_name, a
            own = list(m.parameters(recurse=False))
            if root is m or (own and not _trains(own, held)):
                continue
            if id(root) not in trained:
                trained[id(root)] = _trains(root.parameters(), held)
            if trained[id(root)]:
                regions.setdefault(root_name, []).append(f"{name} ({type(m).__name__})")
        return regions


def _trains(params: Any, held: dict[int, torch.Tensor] | None) -> bool:
    """Whether any of ``params`` is trained: requires a gradient, (optimizers known) is held by one, and
    got a gradient (a teacher run under ``no_grad`` in eval mode, held by ``Adam(self.parameters())``,
    is not trained)."""
    return any(p.requires_grad and p.grad is not None and (held is None or id(p) in held) for p in params)


def _ancestors(name: str) -> list[str]:
    """``"a.b.c" -> ["", "a", "a.b"]``; the root's own name is ``""``."""
    if not name:
        return []
    parts = name.split(".")
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts))]
