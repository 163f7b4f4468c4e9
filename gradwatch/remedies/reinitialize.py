"""``reinitialize``: give dead, saturated or badly initialized units fresh weights, early in training."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from gradwatch.errors import ConfigError, check_positive_int
from gradwatch.findings import Action, Finding
from gradwatch.probes.activations import DEAD_RATE, kind_of
from gradwatch.probes.dataflow import NORMS, WEIGHTED, Pair, pair_of
from gradwatch.remedies.base import Remedy
from gradwatch.remedies.reinit_limits import refusal

log = logging.getLogger("gradwatch")


def _units_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _units_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


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
      channel in each BatchNorm they pass through, and zero outgoing weights in the Linear/Conv that reads
      them (ReDo, Sokar et al. 2023: the network's function is unchanged at the moment of the reset, and
      the units can learn again). When 90% or more of the layer is dead, its outgoing weights are drawn
      fresh instead: a dead layer passes no signal, and zero outgoing weights would leave it without
      gradient.
    - ``saturated_activations``: its Linear/Conv gets Xavier weights (gain 5/3 tanh, 1 sigmoid), bias 0.
    - ``poor_initialization``: every Linear/Conv gets He (ReLU-family models) or Xavier (tanh/sigmoid
      models) weights and bias 0, unless the model was loaded rather than freshly initialized: the fit
      resumed from a checkpoint (Lightning's ``fit(ckpt_path=...)``, or gradwatch's own state restored),
      a parameter has ``requires_grad=False`` (a frozen pretrained part), or ``pretrained=True``. The
      weights' scale is no evidence either way: N(0, 1) weights are the very fault the rule reports.

    Which Linear/Conv feeds an activation, and which reads it, comes from the forward pass of the last
    sampled step (:mod:`gradwatch.probes.dataflow`): one ``nn.ReLU`` used after fc1, fc2 and fc3 is
    judged per call (``act@fc1``, ...), and a finding on ``act@fc1`` re-initializes fc1. Registration order
    stands in only under ``torch.compile``. Parameters with ``requires_grad=False`` are never touched: a
    finding that would need them gets no action (the log says why, once).

    The optimizer state (moments, momentum buffers) of exactly the re-initialized slices is zeroed. A
    fixed-seed generator makes every rank draw the same weights. Each layer is re-initialized at most
    once; after ``max_step`` (2000) steps the remedy stands aside.
    """

    name = "reinitialize"
    answers = ("dead_units", "saturated_activations", "poor_initialization")

    def __init__(
        self,
        max_step: int = 2000,
        cooldown_steps: int = 0,
        budget: int = 10,
        seed: int = 0,
        pretrained: bool = False,
    ) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.max_step = check_positive_int("Reinitialize(max_step=...)", max_step, 2000)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"Reinitialize(seed=...) must be an int, got {seed!r}. Write e.g. seed=0.")
        if not isinstance(pretrained, bool):
            raise ConfigError(
                f"Reinitialize(pretrained=...) must be True or False, got {pretrained!r}. Write e.g. "
                "pretrained=True when the model's weights were loaded."
            )
        self.seed, self.pretrained = seed, pretrained
        self.done: list[str] = []
        self.resumed = False  # gradwatch's state was restored from a checkpoint: this fit continues a run
        self._told: set[str] = set()  # why a finding got no action, logged once per rule and layer

    def new_run(self) -> None:
        super().new_run()
        self.done, self.resumed = [], False

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
        model = training.model
        named = dict(model.named_modules())
        pair = pair_of(model, finding.layer) if finding.rule != "poor_initialization" else None
        why = refusal(finding.rule, finding.layer, model, pair, self.pretrained, self.resumed)
        if why is not None:
            if key not in self._told:  # once per rule and layer: the finding may come again
                self._told.add(key)
                where = f" in {finding.layer}" if finding.layer else ""
                log.info("gradwatch: reinitialize does not answer %s%s: %s", finding.rule, where, why)
            return None
        gen = torch.Generator().manual_seed(self.seed + finding.step)
        optimizers = training.optimizers()
        with torch.no_grad():
            if finding.rule == "dead_units":
                detail = self._dead(finding.layer, pair, named, ctx, optimizers, gen)
            elif finding.rule == "saturated_activations":
                detail = self._saturated(finding.layer, pair, named, optimizers, gen)
            else:
                detail = self._all(list(named.items()), optimizers, gen)
        if detail is None:
            return None
        self.done.append(key)
        what = detail.pop("what")
        return self.action(finding, f"re-initialized {what}", **detail)

    def _dead(
        self,
        layer: str | None,
        pair: Pair | None,
        named: dict[str, nn.Module],
        ctx: Any,
        optimizers: list[torch.optim.Optimizer],
        gen: torch.Generator,
    ) -> dict[str, Any] | None:
        activity = ctx.unit_activity(layer)
        producer = named.get(pair.producer) if pair is not None and pair.producer else None
        units = _units_out(producer) if isinstance(producer, WEIGHTED) else -1
        # every rank acts, or none: a module that ran on one rank only (a branch) has no activity on the
        # others, and a rank alone in the all-reduce below would wait for ever
        if ctx.context.reduce_any(activity is None or activity.numel() != units):
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
        norms = [m for n in pair.norms if isinstance(m := named.get(n), NORMS) and m.num_features == units]
        for bn in norms:  # the BatchNorm channels the units pass through, on the way in or out
            d = dead.to(bn.weight.device) if bn.weight is not None else dead
            if bn.weight is not None:
                bn.weight.index_fill_(0, d, 1.0)
                bn.bias.index_fill_(0, d, 0.0)
                touched += reset_optimizer_state(optimizers, bn.weight, dead)
                touched += reset_optimizer_state(optimizers, bn.bias, dead)
            if bn.running_mean is not None:
                bn.running_mean.index_fill_(0, dead.to(bn.running_mean.device), 0.0)
                bn.running_var.index_fill_(0, dead.to(bn.running_var.device), 1.0)
        nxt = named.get(pair.consumer) if pair.consumer else None
        consumer = nxt if isinstance(nxt, WEIGHTED) and _units_in(nxt) == units else None
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
        outgoing = (
            "no outgoing weights" if consumer is None else "fresh outgoing" if whole else "zero outgoing"
        )
        return {
            "what": f"{dead.numel()} dead unit(s) of {units} in {pair.producer} (fresh incoming weights, "
            + f"{outgoing})",
            "layer": pair.producer,
            "consumer": pair.consumer if consumer is not None else None,
            "units": int(dead.numel()),
            "of": units,
            "dead_frac_before": float(dead.numel()) / units,
            "optimizer_tensors_reset": touched,
        }

    def _saturated(
        self,
        layer: str | None,
        pair: Pair | None,
        named: dict[str, nn.Module],
        optimizers: list[torch.optim.Optimizer],
        gen: torch.Generator,
    ) -> dict[str, Any] | None:
        producer = named.get(pair.producer) if pair is not None and pair.producer else None
        if not isinstance(producer, WEIGHTED):
            return None
        act = named.get(layer.split("@")[0].split("#")[0]) if layer else None  # tanh@fc1: a call of tanh
        gain = 5 / 3 if act is not None and kind_of(act) == "tanh" else 1.0
        before = float(producer.weight.detach().float().std())  # sync: acting, rare
        touched = self._fresh(producer, optimizers, gen, xavier=True, gain=gain)
        after = float(producer.weight.detach().float().std())  # sync: acting, rare
        return {
            "what": f"{pair.producer} with Xavier weights (gain {gain:.3g})",
            "layer": pair.producer,
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
        weighted = [(n, m) for n, m in modules if isinstance(m, WEIGHTED)]
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
        self.resumed = True  # a checkpoint's state: the weights it comes with were trained, not initialized
