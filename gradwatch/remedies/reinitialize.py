"""``reinitialize``: give dead, saturated or badly initialized units fresh weights, early in training."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradwatch.errors import ConfigError, check_positive_int
from gradwatch.findings import Action, Finding
from gradwatch.probes.activations import DEAD_RATE, kind_of
from gradwatch.remedies.base import Remedy

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _units_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _units_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


_ELEMENTWISE = (
    *_NORMS,
    nn.Dropout,
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Mish,
    nn.Softplus,
    nn.SELU,
    nn.CELU,
    nn.PReLU,
)


def _elementwise_run(modules: list[tuple[str, nn.Module]], i: int) -> list[nn.Module]:
    """The leaf modules right after ``modules[i]`` (registration order) that keep its units as they are.

    The next Linear/Conv is the units' consumer only if nothing else (pooling, flattening, attention)
    comes between. Registration order is taken as execution order, which holds for ``nn.Sequential``
    stacks; anything unknown stops the search, and then outgoing weights are left alone.
    """
    out: list[nn.Module] = []
    for _, m in modules[i + 1 :]:
        if not isinstance(m, _ELEMENTWISE):
            break
        out.append(m)
    return out


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over every rank when ``torch.distributed`` runs with several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def reset_optimizer_state(
    optimizers: list[torch.optim.Optimizer],
    param: torch.Tensor,
    index: torch.Tensor | None = None,
    dim: int = 0,
) -> int:
    """Zero the optimizer state (moments, momentum) of ``param``, or only of ``index`` along ``dim``.

    Returns the number of state tensors touched. Scalar state (Adam's ``step``) is left as is.
    """
    touched = 0
    for opt in optimizers:
        state = opt.state.get(param, {})
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                with torch.no_grad():
                    if index is None:
                        value.zero_()
                    else:
                        value.index_fill_(dim, index.to(value.device), 0.0)
                touched += 1
    return touched


class Reinitialize(Remedy):
    """Re-initialize what a finding names, and reset exactly its optimizer state, before ``max_step``.

    - ``dead_units``: the dead units (active on < 1% of samples at the last sample) get fresh incoming
      weights (PyTorch's default Kaiming-uniform, bias 0) in the Linear/Conv that feeds them, a reset
      BatchNorm channel if one sits between, and zero outgoing weights in the next Linear/Conv (ReDo,
      Sokar et al. 2023: the network's function is unchanged at the moment of the reset, and the units
      can learn again). When 90% or more of the layer is dead, its outgoing weights are drawn fresh
      instead: a dead layer passes no signal, and zero outgoing weights would leave it without gradient.
    - ``saturated_activations``: its Linear/Conv gets Xavier weights (gain 5/3 tanh, 1 sigmoid), bias 0.
    - ``poor_initialization``: every Linear/Conv gets He (ReLU-family models) or Xavier (tanh/sigmoid
      models) weights and bias 0.

    The optimizer state (moments, momentum buffers) of exactly the re-initialized slices is zeroed. A
    fixed-seed generator makes every rank draw the same weights. Each layer is re-initialized at most
    once; after ``max_step`` (2000) steps the remedy stands aside.
    """

    name = "reinitialize"
    answers = ("dead_units", "saturated_activations", "poor_initialization")

    def __init__(
        self, max_step: int = 2000, cooldown_steps: int = 0, budget: int = 10, seed: int = 0
    ) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.max_step = check_positive_int("Reinitialize(max_step=...)", max_step, 2000)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"Reinitialize(seed=...) must be an int, got {seed!r}. Write e.g. seed=0.")
        self.seed = seed
        self.done: list[str] = []

    def new_run(self) -> None:
        super().new_run()
        self.done = []

    # ------------------------------------------------------------------ acting
    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        training = ctx.context
        if training is None or finding.step > self.max_step:
            return None
        key = f"{finding.rule}:{finding.layer}"
        if key in self.done or (
            finding.rule == "poor_initialization" and any(k.startswith("poor") for k in self.done)
        ):
            return None
        gen = torch.Generator().manual_seed(self.seed + finding.step)
        modules = list(training.model.named_modules())
        optimizers = training.optimizers()
        with torch.no_grad():
            if finding.rule == "dead_units":
                detail = self._dead(finding.layer, modules, ctx, optimizers, gen)
            elif finding.rule == "saturated_activations":
                detail = self._saturated(finding.layer, modules, optimizers, gen)
            else:
                detail = self._all(modules, optimizers, gen)
        if detail is None:
            return None
        self.done.append(key)
        what = detail.pop("what")
        return self.action(finding, f"re-initialized {what}", **detail)

    def _producer(
        self, name: str | None, modules: list[tuple[str, nn.Module]]
    ) -> tuple[int, str, nn.Module] | None:
        """The Linear/Conv at or before module ``name``."""
        idx = next((i for i, (n, _) in enumerate(modules) if n == name), None)
        if idx is None:
            return None
        for i in range(idx, -1, -1):
            n, m = modules[i]
            if isinstance(m, _WEIGHTED):
                return i, n, m
        return None

    def _dead(
        self,
        layer: str | None,
        modules: list[tuple[str, nn.Module]],
        ctx: Any,
        optimizers: list[torch.optim.Optimizer],
        gen: torch.Generator,
    ) -> dict[str, Any] | None:
        activity = ctx.unit_activity(layer)
        found = self._producer(layer, modules)
        if activity is None or found is None:
            return None
        i, name, producer = found
        units = _units_out(producer)
        if activity.numel() != units:
            return None
        activity = mean_over_ranks(activity)  # every rank must re-initialize the same units
        dead = torch.nonzero(activity < DEAD_RATE).flatten().cpu()  # sync: acting, rare
        if dead.numel() == 0:
            return None
        fresh = torch.empty_like(producer.weight, device="cpu")
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)  # PyTorch's own default for the layer
        w = producer.weight
        w.index_copy_(0, dead.to(w.device), fresh.index_select(0, dead).to(w.device, w.dtype))
        touched = reset_optimizer_state(optimizers, w, dead)
        if producer.bias is not None:
            producer.bias.index_fill_(0, dead.to(producer.bias.device), 0.0)
            touched += reset_optimizer_state(optimizers, producer.bias, dead)
        after = _elementwise_run(modules, i)  # the modules the units' values flow through unchanged in shape
        norms = [m for m in after if isinstance(m, _NORMS) and m.num_features == units][:1]
        for bn in norms:
            d = dead.to(bn.weight.device)
            bn.weight.index_fill_(0, d, 1.0)
            bn.bias.index_fill_(0, d, 0.0)
            if bn.running_mean is not None:
                bn.running_mean.index_fill_(0, d, 0.0)
                bn.running_var.index_fill_(0, d, 1.0)
            touched += reset_optimizer_state(optimizers, bn.weight, dead) + reset_optimizer_state(
                optimizers, bn.bias, dead
            )
        nxt = modules[i + 1 + len(after)][1] if i + 1 + len(after) < len(modules) else None
        consumer = nxt if isinstance(nxt, _WEIGHTED) and _units_in(nxt) == units else None
        whole = dead.numel() >= 0.9 * units
        if consumer is not None:
            cw = consumer.weight
            if whole:  # the layer carried no signal: zero outgoing weights would cut the path for good
                out = torch.empty_like(cw, device="cpu")
                nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=gen)
                cw.index_copy_(1, dead.to(cw.device), out.index_select(1, dead).to(cw.device, cw.dtype))
            else:  # ReDo: the function is unchanged at the moment of the reset
                cw.index_fill_(1, dead.to(cw.device), 0.0)
            touched += reset_optimizer_state(optimizers, cw, dead, dim=1)
        return {
            "what": f"{dead.numel()} dead unit(s) of {units} in {name} (fresh incoming weights, "
            + ("fresh outgoing)" if whole else "zero outgoing)"),
            "layer": name,
            "units": int(dead.numel()),
            "of": units,
            "dead_frac_before": float(dead.numel()) / units,
            "optimizer_tensors_reset": touched,
        }

    def _saturated(
        self,
        layer: str | None,
        modules: list[tuple[str, nn.Module]],
        optimizers: list[torch.optim.Optimizer],
        gen: torch.Generator,
    ) -> dict[str, Any] | None:
        found = self._producer(layer, modules)
        if found is None:
            return None
        _, name, producer = found
        act = next((m for n, m in modules if n == layer), None)
        gain = 5 / 3 if act is not None and kind_of(act) == "tanh" else 1.0
        before = float(producer.weight.detach().float().std())  # sync: acting, rare
        touched = self._fresh(producer, optimizers, gen, xavier=True, gain=gain)
        after = float(producer.weight.detach().float().std())  # sync: acting, rare
        return {
            "what": f"{name} with Xavier weights (gain {gain:.3g})",
            "layer": name,
            "weight_std_before": before,
            "weight_std_after": after,
            "optimizer_tensors_reset": touched,
        }

    def _all(
        self,
        modules: list[tuple[str, nn.Module]],
        optimizers: list[torch.optim.Optimizer],
        gen: torch.Generator,
    ) -> dict[str, Any] | None:
        weighted = [(n, m) for n, m in modules if isinstance(m, _WEIGHTED)]
        if not weighted:
            return None
        xavier = any(kind_of(m) in ("tanh", "sigmoid") for _, m in modules)
        touched = sum(self._fresh(m, optimizers, gen, xavier=xavier, gain=1.0) for _, m in weighted)
        scheme = "Xavier" if xavier else "He"
        return {
            "what": f"{len(weighted)} Linear/Conv layers with {scheme} initialization",
            "layers": len(weighted),
            "scheme": scheme,
            "optimizer_tensors_reset": touched,
        }

    @staticmethod
    def _fresh(
        m: nn.Module, optimizers: list[torch.optim.Optimizer], gen: torch.Generator, xavier: bool, gain: float
    ) -> int:
        fresh = torch.empty_like(m.weight, device="cpu")
        if xavier:
            nn.init.xavier_uniform_(fresh, gain=gain, generator=gen)
        else:
            nn.init.kaiming_normal_(fresh, nonlinearity="relu", generator=gen)
        m.weight.copy_(fresh)
        touched = reset_optimizer_state(optimizers, m.weight)
        if m.bias is not None:
            m.bias.zero_()
            touched += reset_optimizer_state(optimizers, m.bias)
        return touched

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": list(self.done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.done = list(state.get("done", []))
