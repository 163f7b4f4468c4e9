"""Data flow on a sampled step: which Linear/Conv call feeds each activation call, and which one reads it.

Only the forward pass says where an activation's units come from: a shared module
(``self.act = nn.ReLU()`` called after fc1, fc2 and fc3) is three (producer, call) pairs, and an
activation registered out of order belongs to whatever fed it, not to the module before it. On sampled
steps the activation probe's forward hooks (and the ones here, on BatchNorm/Dropout/Identity) tag each
output tensor with where its units come from; the next module looks its input up. A tag is a weak
reference, so a freed tensor whose ``id`` is reused by a new one is not mistaken for it. Functional
activations (``F.relu`` inside ``forward``) are walked through on the autograd graph: the node of a
consumer's input leads back to the producer's output node. Cost: a dict entry per module call on
sampled steps, Python object identities only (no device work, no host sync).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Modules that hand their input's units on unchanged in number and order.
PASS_THROUGH = (*NORMS, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
#: Autograd nodes of elementwise functions (``F.relu``, ``torch.tanh``, ... called inside ``forward``); also
#: ``MulBackward0`` by a constant (``F.dropout`` on CPU, a mask or a scale).
_ELEMENTWISE_NODES = frozenset(
    f"{op}Backward0"
    for op in ("Relu", "Tanh", "Sigmoid", "Gelu", "Silu", "LeakyRelu", "Elu", "Hardtanh", "Hardsigmoid")
    + ("Softplus", "Mish", "NativeDropout")
)

#: A tensor's origin: ``("w", linear_name, norms)`` or ``("act", (module, producer), norms)``.
Tag = tuple[str, Any, tuple[str, ...]]

#: Activation modules: elementwise, for the registration-order fallback.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardtanh)
_ACTIVATIONS += (nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.SELU, nn.CELU, nn.PReLU)

_FLOWS: weakref.WeakKeyDictionary[nn.Module, DataFlow] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Pair:
    """Where the units of one watched call come from and go to (module names; ``None``: not seen).

    Attributes:
        producer: the Linear/Conv whose output units these are.
        norms: the BatchNorm modules the units pass through on the way (same units, same order).
        consumer: the Linear/Conv that reads them next (its input columns/channels are these units).
    """

    producer: str | None
    norms: tuple[str, ...] = ()
    consumer: str | None = None


def flow_of(model: nn.Module) -> DataFlow | None:
    """The data flow the activation probe of ``model`` recorded, or ``None`` (no probe, or a compiled model,
    whose hooks dynamo traces: tensor identities are not the runtime ones there)."""
    return _FLOWS.get(model)


def pair_of(model: nn.Module, layer: str | None) -> Pair | None:
    """The producer, norms and consumer of the stats entry ``layer`` (a finding's layer), from the data flow
    of the last sampled step; ``None`` where it saw none. A compiled model has no recorded flow: there
    registration order stands in (:func:`registration_pair`)."""
    flow = flow_of(model)
    if flow is not None:
        return flow.pairs.get(layer) if layer else None
    return registration_pair(list(model.named_modules()), layer)


def registration_pair(modules: list[tuple[str, nn.Module]], layer: str | None) -> Pair | None:
    """Registration order taken as execution order (true of ``nn.Sequential`` stacks): the Linear/Conv at
    or before ``layer``, the BatchNorm of the elementwise modules right after it, and the next Linear/Conv
    if nothing else (pooling, flattening, attention) comes between."""
    idx = next((i for i, (n, _) in enumerate(modules) if n == layer), None)
    if idx is None:
        return None
    i = next((j for j in range(idx, -1, -1) if isinstance(modules[j][1], WEIGHTED)), None)
    if i is None:
        return None
    run = []
    for n, m in modules[i + 1 :]:
        if not isinstance(m, (*PASS_THROUGH, *_ACTIVATIONS)):
            break
        run.append((n, m))
    norms = tuple(n for n, m in run if isinstance(m, NORMS))[:1]
    j = i + 1 + len(run)
    consumer = modules[j][0] if j < len(modules) and isinstance(modules[j][1], WEIGHTED) else None
    return Pair(modules[i][0], norms, consumer)


def pass_through_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PASS_THROUGH)]


class DataFlow:
    """The pairs of one model's watched calls, as the last sampled step saw them (:attr:`pairs`)."""

    def __init__(self, model: nn.Module) -> None:
        #: final stats name (``"act"``, ``"act@fc1"``, a Linear's name) -> its :class:`Pair`
        self.pairs: dict[str, Pair] = {}
        self._tags: dict[int, tuple[Any, Tag]] = {}  # id(tensor) -> (weakref to it, its tag)
        self._nodes: dict[int, tuple[Any, Tag]] = {}  # id(autograd node of a tagged output) -> (node, tag)
        self._before: dict[Any, tuple[str, ...]] = {}  # call key -> norms between producer and the call
        self._after: dict[Any, tuple[str, ...]] = {}  # call key (or Linear name) -> norms before its reader
        self._consumer: dict[Any, str] = {}  # call key (or Linear name) -> the Linear/Conv reading it
        self._calls: dict[str, int] = {}  # module -> calls so far this step
        _FLOWS[model] = self

    def count(self, module: str) -> int:
        """One more call of ``module`` this step: its number (1 for the first)."""
        self._calls[module] = n = self._calls.get(module, 0) + 1
        return n

    # ------------------------------------------------------------------ tags
    def _tag(self, t: Any, tag: Tag) -> None:
        if isinstance(t, torch.Tensor):
            self._tags[id(t)] = (weakref.ref(t), tag)
            node = t.grad_fn
            if node is not None:  # held until clear(): the autograd graph holds it until backward anyway
                self._nodes[id(node)] = (node, tag)

    def _tag_of(self, t: Any) -> Tag | None:
        """Where ``t``'s units come from: its own tag, else the tag met walking back through elementwise
        functions on the autograd graph (``F.relu(fc(x))``)."""
        if not isinstance(t, torch.Tensor):
            return None
        entry = self._tags.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        node = t.grad_fn
        for _ in range(4):  # e.g. dropout(relu(...))
            if node is None:
                return None
            found = self._nodes.get(id(node))
            if found is not None and found[0] is node:
                return found[1]
            inputs = node.next_functions
            scaled = node.name() == "MulBackward0" and all(f is None for f, _ in inputs[1:])  # CPU dropout
            if not inputs or not (scaled or node.name() in _ELEMENTWISE_NODES):
                return None
            node = inputs[0][0]
        return None

    # ------------------------------------------------------------------ what the hooks report
    def weighted(self, name: str, x: Any, y: Any) -> None:
        """The Linear/Conv ``name`` read ``x`` and wrote ``y``."""
        src = self._tag_of(x)
        if src is not None and src[1] not in self._consumer:  # the first reader is the consumer
            self._consumer[src[1]] = name
            self._after[src[1]] = src[2]
        self._tag(y, ("w", name, ()))

    def passed(self, name: str, norm: bool, x: Any, y: Any) -> None:
        """A pass-through module (BatchNorm, Dropout, Identity) read ``x`` and wrote ``y``."""
        src = self._tag_of(x)
        if src is not None:
            self._tag(y, (src[0], src[1], src[2] + (name,) if norm else src[2]))

    def activation(self, name: str, x: Any, y: Any) -> str | None:
        """The activation module ``name`` read ``x`` and wrote ``y``: returns the Linear/Conv that fed it."""
        src = self._tag_of(x)
        producer, norms = (src[1], src[2]) if src is not None and src[0] == "w" else (None, ())
        key = (name, producer)
        self._before.setdefault(key, norms)
        self._tag(y, ("act", key, ()))
        return producer

    # ------------------------------------------------------------------ the step's result
    def settle(self, named: dict[tuple[str, str | None], str], linear: set[str]) -> None:
        """This step's pairs under their final stats names (``named``: call key -> name); ``linear``: the
        modules that are Linear/Conv themselves (their own producer). Per-call records are cleared."""
        for key, final in named.items():
            module, producer = key
            if module in linear:
                self.pairs[final] = Pair(module, self._after.get(module, ()), self._consumer.get(module))
            else:
                norms = self._before.get(key, ()) + self._after.get(key, ())
                self.pairs[final] = Pair(producer, norms, self._consumer.get(key))
        self.clear()

    def clear(self) -> None:
        for records in (self._tags, self._nodes, self._before, self._after, self._consumer, self._calls):
            records.clear()


def call_names(keys: list[tuple[str, str | None, int]]) -> list[str]:
    """Stats names of ``(module, producer, call number)`` keys: the module's own name when it ran for one
    producer (so unshared modules keep their names and TensorBoard tags), else ``module@producer``, or
    ``module#n`` (its n-th call) where no producer was seen.

    Example:
        >>> call_names([("act", "fc1", 1), ("act", "fc2", 2), ("act", None, 3), ("out", "fc3", 1)])
        ['act@fc1', 'act@fc2', 'act#3', 'out']
    """
    counts: dict[str, int] = {}
    for module, _, _ in keys:
        counts[module] = counts.get(module, 0) + 1
    return [m if counts[m] == 1 else f"{m}@{p}" if p is not None else f"{m}#{n}" for m, p, n in keys]
