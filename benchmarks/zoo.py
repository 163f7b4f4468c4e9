"""A fault zoo: real small trainings with known faults, and healthy ones that must stay silent.

    python benchmarks/zoo.py                 # every scenario, default HealthMonitor(), remedies off
    python benchmarks/zoo.py --only mlp_nan_batch cnn_bn_small_batch

Each faulty scenario names the rule(s) that should catch it and the step its fault starts. Two faults
start on their own rather than at a scripted step; their onset is measured in the same run, without
gradwatch, by a plain ground-truth callback (see :class:`GroundTruth`), and the table marks it with
``~``. The table shows what fired (warning/critical findings, first step of each rule) and the latency
from the onset to the first expected finding. Data ships with scikit-learn (digits, breast cancer, wine) or is
generated (sequences), so this runs offline, on 2 CPU cores, in a few minutes.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_digits, load_wine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch

# ---------------------------------------------------------------------------------------------- data


def _split(x: torch.Tensor, y: torch.Tensor, n_train: int | None = None, seed: int = 0):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(x))
    train_n = n_train or cut
    return (x[:train_n], y[:train_n]), (x[cut:], y[cut:])


def _standardize(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(0)) / (x.std(0) + 1e-8)


def data_digits(scale: float = 1 / 16, image: bool = False, n_train: int | None = None):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) * scale
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _split(x, torch.tensor(y), n_train)


def data_table(loader: Callable, standardize: bool = True):
    x, y = loader(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    return _split(_standardize(x) if standardize else x, torch.tensor(y))


def data_sequences(n: int = 2048, length: int = 16, features: int = 4):
    """Sequences of N(0,1) vectors; the label says whether feature 0 sums to more than 0 over time."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, length, features, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long()
    return _split(x, y)


DATA: dict[str, Callable[[], Any]] = {
    "digits": data_digits,
    "digits_raw": lambda: data_digits(scale=1.0),
    "digits_img": lambda: data_digits(image=True),
    "digits_small": lambda: data_digits(n_train=64),
    "cancer": lambda: data_table(load_breast_cancer),
    "cancer_raw": lambda: data_table(load_breast_cancer, standardize=False),
    "wine": lambda: data_table(load_wine),
    "seq": data_sequences,
}

# -------------------------------------------------------------------------------------------- models


def mlp(n_in: int, hidden: tuple[int, ...], n_out: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip((n_in, *hidden[:-1]), hidden, strict=True):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers, nn.Linear(hidden[-1], n_out))


def cnn_bn(n_out: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, n_out),
    )


class Recurrent(nn.Module):
    def __init__(self, cell: str = "gru", features: int = 4, hidden: int = 32, n_out: int = 2) -> None:
        super().__init__()
        if cell == "gru":
            self.rnn: nn.Module = nn.GRU(features, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(
                features, hidden, batch_first=True, nonlinearity="relu" if cell == "rnn_relu" else "tanh"
            )
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self, features: int = 4, d: int = 32, n_out: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def init_normal(std: float = 1.0) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, std)
                nn.init.zeros_(m.bias)

    return apply


def first_bias(value: float) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        nn.init.constant_(next(m for m in model.modules() if isinstance(m, nn.Linear)).bias, value)

    return apply


def bn_shift(value: float) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.bias, value)

    return apply


def recurrent_gain(gain: float) -> Callable[[nn.Module], None]:
    def apply(model: nn.Module) -> None:
        nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=gain)

    return apply


# ---------------------------------------------------------------------------------------- the module


@dataclass
class Faults:
    nan_at: int | None = None  # inputs of that step's batch are NaN
    scale_at: tuple[int, float] | None = None  # inputs of that step's batch multiplied by a factor
    shuffle_labels_at: int | None = None  # that step's labels replaced by random ones
    lr_jump_at: tuple[int, float] | None = None  # LR multiplied by a factor from that step on
    detach_first: bool = False  # the first layer's output is detached: it never gets a gradient
    freeze_first_lr: bool = False  # the first layer is in a param group with lr 0
    eval_mode: bool = False  # model.eval() left on before fit: dropout off, BatchNorm on running statistics
    decay_group_only: bool = False  # the optimizer gets only the weight-decay group: biases, norms left out
    repeat_batch: bool = False  # the sampler repeats the first batch's indices: the same batch every step
    keep_grads: bool = False  # optimizer_zero_grad overridden to do nothing: gradients never cleared


class ZooModule(pl.LightningModule):
    def __init__(
        self, model: nn.Module, opt: str, lr: float, schedule: str | None, faults: Faults, total_steps: int
    ) -> None:
        super().__init__()
        self.model, self.opt, self.lr, self.schedule, self.faults = model, opt, lr, schedule, faults
        self.total_steps = total_steps
        if faults.eval_mode:
            self.eval()  # Lightning keeps the mode a model has when fit starts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.faults.detach_first and isinstance(self.model, nn.Sequential):
            return self.model[1:](self.model[0](x).detach())
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        f, step = self.faults, self.global_step
        if f.nan_at == step:
            x = torch.full_like(x, math.nan)
        if f.scale_at and f.scale_at[0] == step:
            x = x * f.scale_at[1]
        if f.shuffle_labels_at == step:
            y = torch.randint_like(y, int(y.max()) + 1)
        loss = F.cross_entropy(self(x), y)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        if not self.faults.keep_grads:  # Lightning's own: optimizer.zero_grad()
            optimizer.zero_grad()

    def _lr_factor(self, s: int) -> float:
        total, jump = self.total_steps, self.faults.lr_jump_at
        factor = 1.0
        if self.schedule == "warmup_cosine":
            warm = max(total // 10, 1)
            factor = (
                (s + 1) / warm
                if s < warm
                else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(total - warm, 1)))
            )
        elif self.schedule == "step":
            factor = 0.5 ** (s // max(total // 3, 1))
        elif self.schedule == "epoch_cosine_per_step":  # CosineAnnealingLR(T_max=6 epochs) stepped per batch
            factor = 0.5 * (1 + math.cos(math.pi * s / 6))
        if jump and s >= jump[0]:
            factor *= jump[1]
        return factor

    def configure_optimizers(self):
        params: Any = self.parameters()
        if self.faults.freeze_first_lr:
            first = list(self.model[0].parameters())
            rest = [p for p in self.parameters() if all(p is not q for q in first)]
            params = [{"params": first, "lr": 0.0}, {"params": rest}]
        if self.faults.decay_group_only:  # the no-decay group (biases, BatchNorm parameters) was lost
            params = [p for p in self.parameters() if p.ndim >= 2]
        opt = {
            "sgd": lambda: torch.optim.SGD(params, lr=self.lr),
            "momentum": lambda: torch.optim.SGD(params, lr=self.lr, momentum=0.9),
            "adam": lambda: torch.optim.Adam(params, lr=self.lr),
            "adamw": lambda: torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01),
        }[self.opt]()
        if self.schedule == "onecycle":
            sched: Any = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=self.lr, total_steps=self.total_steps + 1
            )
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------ scenarios


@dataclass
class Scenario:
    name: str
    data: str
    model: Callable[[], nn.Module]
    opt: str
    lr: float
    epochs: int
    batch_size: int = 64
    schedule: str | None = None
    faults: Faults = field(default_factory=Faults)
    init: Callable[[nn.Module], None] | None = None
    expected: tuple[str, ...] = ()  # empty: a healthy run
    #: step the fault starts, or how to measure it in the run: "grad_jump" (the first step whose gradient
    #: norm is 10x the median of the steps before it) or "val_min" (the last step before the validation
    #: with the lowest loss: from there on, training only fits the training set better)
    onset: int | str | None = None
    kind: str = ""  # "acute", "early" (initialization, inputs, saturation) or "" (other)
    val_every: float = 1.0  # validation interval, as Trainer(val_check_interval=...) when < 1
    recoverable: bool = False  # a remedy can repair it in place (not a data or architecture fault)
    twin: dict[str, Any] = field(
        default_factory=dict
    )  # overrides for the fault-free twin, beyond faults/init

    @property
    def healthy(self) -> bool:
        return not self.expected


def _digits_mlp(act=nn.ReLU, hidden=(128, 64)):
    return lambda: mlp(64, hidden, 10, act)


# fmt: off
SCENARIOS: list[Scenario] = [
    # ---- faulty: acute
    Scenario("mlp_nan_batch", "digits", _digits_mlp(), "momentum", 0.05, 3, faults=Faults(nan_at=30),
             expected=("nonfinite",), onset=30, kind="acute", recoverable=True),
    Scenario("cnn_bn_nan_batch", "digits_img", cnn_bn, "adam", 3e-3, 10, batch_size=32, faults=Faults(nan_at=25),
             expected=("nonfinite",), onset=25, kind="acute", recoverable=True),
    Scenario("mlp_gradient_spike", "digits", _digits_mlp(), "adam", 3e-3, 3, faults=Faults(scale_at=(60, 30.0)),
             expected=("gradient_spike",), onset=60, kind="acute", recoverable=True),
    Scenario("mlp_loss_spike", "digits", _digits_mlp(), "adam", 3e-3, 4, faults=Faults(shuffle_labels_at=80),
             expected=("loss_spike",), onset=80, kind="acute", recoverable=True),
    Scenario("gru_corrupted_batch", "seq", lambda: Recurrent("gru"), "adam", 3e-3, 3,
             faults=Faults(scale_at=(50, 40.0), shuffle_labels_at=50), expected=("gradient_spike", "loss_spike"),
             onset=50, kind="acute", recoverable=True),
    # ---- faulty: instability
    Scenario("mlp_lr_jump", "digits", _digits_mlp(), "momentum", 0.05, 8, faults=Faults(lr_jump_at=(40, 60.0)),
             expected=("divergence", "exploding_gradients", "nonfinite", "loss_spike", "gradient_spike"), onset=40,
             recoverable=True),
    Scenario("transformer_lr_jump", "seq", TinyTransformer, "adamw", 1e-3, 6, faults=Faults(lr_jump_at=(40, 100.0)),
             expected=("divergence", "exploding_gradients", "loss_spike", "gradient_spike", "update_ratio"), onset=40,
             recoverable=True),
    Scenario("rnn_relu_exploding", "seq", lambda: Recurrent("rnn_relu"), "momentum", 0.05, 3,
             expected=("gradient_spike", "exploding_gradients", "nonfinite", "loss_spike"), onset="grad_jump",
             recoverable=True, twin={"lr": 0.01}),
    Scenario("lr_far_too_high", "wine", lambda: mlp(13, (32,), 3), "sgd", 8.0, 12, batch_size=16,
             expected=("update_ratio", "divergence", "exploding_gradients", "nonfinite", "dead_units"), onset=0,
             recoverable=True, twin={"lr": 0.05}),
    # ---- faulty: initialization, activations
    Scenario("deep_sigmoid_vanishing", "digits", _digits_mlp(nn.Sigmoid, (64,) * 8), "sgd", 0.1, 3,
             expected=("vanishing_gradients",), onset=0),
    Scenario("tanh_normal_init", "digits", _digits_mlp(nn.Tanh, (128, 64)), "momentum", 0.02, 3, init=init_normal(1.0),
             expected=("saturated_activations",), onset=0, kind="early", recoverable=True),
    Scenario("relu_negative_bias", "digits", _digits_mlp(), "momentum", 0.05, 2, init=first_bias(-4.0),
             expected=("dead_units",), onset=0, kind="early", recoverable=True),
    Scenario("cnn_bn_dead_units", "digits_img", cnn_bn, "adam", 3e-3, 6, batch_size=32, init=bn_shift(-3.0),
             expected=("dead_units",), onset=0, kind="early", recoverable=True),
    Scenario("deep_relu_normal_init", "digits", _digits_mlp(nn.ReLU, (128,) * 5), "adam", 1e-3, 3,
             init=init_normal(1.0), expected=("poor_initialization",), onset=0, kind="early", recoverable=True),
    # ---- faulty: data, optimizer setup, generalization
    Scenario("digits_raw_pixels", "digits_raw", _digits_mlp(), "adam", 1e-3, 2,
             expected=("unnormalized_inputs",), onset=0, kind="early"),
    Scenario("cancer_raw_features", "cancer_raw", lambda: mlp(30, (64, 32), 2), "adam", 1e-3, 3, batch_size=32,
             expected=("unnormalized_inputs",), onset=0, kind="early"),
    Scenario("lr_far_too_low", "digits", _digits_mlp(), "adam", 1e-7, 12,
             expected=("loss_plateau", "update_ratio"), onset=0),
    Scenario("lr_schedule_per_batch", "digits", _digits_mlp(), "momentum", 0.05, 6, schedule="epoch_cosine_per_step",
             expected=("lr_collapsed",), onset=0, kind="early"),
    Scenario("detached_first_layer", "digits", _digits_mlp(), "adam", 1e-3, 2, faults=Faults(detach_first=True),
             expected=("frozen_weights",), onset=0),
    Scenario("first_layer_lr_zero", "digits", _digits_mlp(), "adam", 1e-3, 2, faults=Faults(freeze_first_lr=True),
             expected=("frozen_weights",), onset=0),
    Scenario("cnn_bn_eval_mode", "digits_img", cnn_bn, "adam", 3e-3, 2, batch_size=32, faults=Faults(eval_mode=True),
             expected=("eval_mode_training",), onset=0, kind="early"),
    Scenario("cnn_bn_no_decay_group", "digits_img", cnn_bn, "adamw", 3e-3, 2, batch_size=32,
             faults=Faults(decay_group_only=True), expected=("unoptimized_parameters",), onset=0, kind="early"),
    Scenario("mlp_repeated_batch", "digits", _digits_mlp(), "adam", 1e-3, 2, faults=Faults(repeat_batch=True),
             expected=("repeated_batch",), onset=0, kind="early"),
    Scenario("mlp_gradients_not_cleared", "digits", _digits_mlp(), "momentum", 0.05, 2, faults=Faults(keep_grads=True),
             expected=("gradients_not_cleared",), onset=0, kind="early"),
    Scenario("overfit_small_train_set", "digits_small", _digits_mlp(nn.ReLU, (512, 512)), "adam", 3e-3, 60,
             batch_size=16, expected=("overfitting",), onset="val_min", recoverable=True),
    # ---- healthy
    Scenario("healthy_mlp_momentum", "digits", _digits_mlp(), "momentum", 0.05, 5),
    Scenario("healthy_mlp_adam_warmup_cosine", "digits", _digits_mlp(), "adam", 3e-3, 5, schedule="warmup_cosine"),
    Scenario("healthy_cnn_bn_small_batches", "digits_img", cnn_bn, "adam", 2e-3, 1, batch_size=8),
    Scenario("healthy_gru_adam", "seq", lambda: Recurrent("gru"), "adam", 3e-3, 4),
    Scenario("healthy_transformer_warmup_cosine", "seq", TinyTransformer, "adamw", 1e-3, 4, schedule="warmup_cosine"),
    Scenario("healthy_wine_steplr", "wine", lambda: mlp(13, (32,), 3), "momentum", 0.02, 30, batch_size=16,
             schedule="step"),
    Scenario("healthy_cancer_tanh_small_batches", "cancer", lambda: mlp(30, (32, 16), 2, nn.Tanh), "sgd", 0.02, 3,
             batch_size=8),
    Scenario("healthy_mlp_onecycle", "digits", _digits_mlp(), "sgd", 0.2, 4, schedule="onecycle"),
]
# fmt: on


# ------------------------------------------------------------------------------------------- running


class GroundTruth(pl.Callback):
    """Plain measurements, independent of gradwatch, that place a self-starting fault's onset: every
    step's total gradient norm (``torch.linalg.vector_norm`` per parameter, read with ``.item()``) and
    each validation's loss with the last optimizer step before it."""

    def __init__(self) -> None:
        self.grad_norms: list[float] = []
        self.val_losses: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        sq = sum(
            torch.linalg.vector_norm(p.grad).item() ** 2 for p in pl_module.parameters() if p.grad is not None
        )
        self.grad_norms.append(math.sqrt(sq))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_loss" in trainer.callback_metrics:
            self.val_losses.append((trainer.global_step - 1, float(trainer.callback_metrics["val_loss"])))

    def onset(self, how: str) -> int | None:
        if how == "grad_jump":
            g = self.grad_norms
            return next(
                (
                    i
                    for i in range(10, len(g))
                    if not math.isfinite(g[i]) or g[i] > 10 * statistics.median(g[:i])
                ),
                None,
            )
        if how == "val_min" and self.val_losses:
            return min(self.val_losses, key=lambda sv: sv[1])[0]
        raise ValueError(f"unknown onset measure {how!r}")


@dataclass
class Result:
    scenario: Scenario
    findings: list[gradwatch.Finding]
    actions: list[gradwatch.Action]
    val_loss: float
    val_acc: float
    steps: int
    seconds: float
    onset: int | None = None  # the scripted onset, or the one measured in this run

    @property
    def alarms(self) -> list[gradwatch.Finding]:
        return [f for f in self.findings if f.severity in ("warning", "critical")]

    def first_steps(self) -> dict[str, int]:
        first: dict[str, int] = {}
        for f in self.alarms:
            first.setdefault(f.rule, f.step)
        return first

    @property
    def detected(self) -> bool:
        return any(r in self.scenario.expected for r in self.first_steps())

    @property
    def latency(self) -> int | None:
        s = self.scenario
        steps = [st for r, st in self.first_steps().items() if r in s.expected and st >= (self.onset or 0)]
        if not steps or self.onset is None:
            return None
        return min(steps) - self.onset


def fault_free(s: Scenario) -> Scenario:
    """The same training without its fault: the healthy reference a repair should reach."""
    return replace(s, name=s.name + "_twin", faults=Faults(), init=None, expected=(), onset=None, **s.twin)


def run(
    s: Scenario,
    seed: int = 0,
    callbacks: list[pl.Callback] | None = None,
    monitor: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
    root: str = "/tmp/gradwatch-zoo",
) -> Result:
    """Train one scenario, then validate the weights it ends with.

    ``monitor`` defaults to ``HealthMonitor(remedies="off")``; ``False`` trains without gradwatch.
    """
    pl.seed_everything(seed, verbose=False)
    (xt, yt), (xv, yv) = DATA[s.data]()
    g = torch.Generator().manual_seed(seed)
    # repeat_batch: the sampler hands out the first batch's indices again and again, an epoch long
    sampler = list(range(s.batch_size)) * (len(xt) // s.batch_size) if s.faults.repeat_batch else None
    train = DataLoader(
        TensorDataset(xt, yt), batch_size=s.batch_size, shuffle=sampler is None, sampler=sampler, generator=g
    )
    val = DataLoader(TensorDataset(xv, yv), batch_size=512)
    model = s.model()
    if s.init:
        s.init(model)
    total = s.epochs * len(train)
    module = ZooModule(model, s.opt, s.lr, s.schedule, s.faults, total)
    if monitor is None:
        monitor = gradwatch.HealthMonitor(
            remedies="off", print_summary=False, events_path=f"{root}/{s.name}.jsonl"
        )
    kw = dict(
        max_epochs=s.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    kw.update(trainer_kwargs or {})
    cbs = [monitor] if isinstance(monitor, pl.Callback) else []
    truth = GroundTruth() if isinstance(s.onset, str) else None
    if truth is not None:
        cbs.append(truth)
    if s.val_every < 1:
        kw["val_check_interval"] = s.val_every
    trainer = pl.Trainer(callbacks=cbs + list(callbacks or []), **kw)
    t0 = time.perf_counter()
    trainer.fit(module, train, val)
    seconds = time.perf_counter() - t0
    (metrics,) = trainer.validate(module, val, verbose=False)  # the weights the run ends with
    val_loss = float(metrics.get("val_loss", math.nan))
    val_acc = float(metrics.get("val_acc", math.nan))
    findings = list(getattr(monitor, "findings", None) or [])
    actions = list(getattr(monitor, "actions", None) or [])
    onset = truth.onset(s.onset) if truth is not None else s.onset
    return Result(s, findings, actions, val_loss, val_acc, trainer.global_step, seconds, onset)


def table(results: list[Result]) -> str:
    rows = [f"{'scenario':<36} {'expected':<34} {'onset':>5}  {'fired (first step)':<58} {'latency':>7}"]
    for r in results:
        s = r.scenario
        fired = ", ".join(f"{rule}@{st}" for rule, st in r.first_steps().items()) or "-"
        expected = (
            "(healthy)" if s.healthy else "|".join(s.expected[:2]) + ("|..." if len(s.expected) > 2 else "")
        )
        ok = (
            ("ok " if not r.alarms else "FALSE ALARM ") if s.healthy else ("ok " if r.detected else "MISSED ")
        )
        lat = "" if r.latency is None else str(r.latency)
        onset = "" if r.onset is None else ("~" if isinstance(s.onset, str) else "") + str(r.onset)
        rows.append(f"{s.name:<36} {expected:<34} {onset:>5}  {ok + fired:<58} {lat:>7}")
    faulty = [r for r in results if not r.scenario.healthy]
    healthy = [r for r in results if r.scenario.healthy]
    lat = [r.latency for r in faulty if r.latency is not None]
    acute = [r.latency for r in faulty if r.scenario.kind == "acute" and r.latency is not None]
    early = [r for r in faulty if r.scenario.kind == "early"]
    early_ok = sum(1 for r in early if r.detected and r.latency is not None and r.latency < _epoch_steps(r))
    rows.append("")
    if acute:
        rows.append(f"acute faults (nonfinite, spikes): median latency {statistics.median(acute):g} steps")
    if early:
        rows.append(
            f"initialization/input/saturation faults detected within the first epoch: {early_ok}/{len(early)}"
        )
    med = statistics.median(lat) if lat else math.nan
    rows.append(
        f"detected {sum(r.detected for r in faulty)}/{len(faulty)} faults, false alarms on "
        f"{sum(bool(r.alarms) for r in healthy)}/{len(healthy)} healthy runs, median latency {med:g} steps"
    )
    return "\n".join(rows)


def _epoch_steps(r: Result) -> int:
    return r.steps // r.scenario.epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gradwatch fault zoo")
    parser.add_argument("--only", nargs="*", help="scenario names")
    parser.add_argument("--verbose", action="store_true", help="print every finding")
    parser.add_argument("--seeds", type=int, default=1, help="run each scenario with seeds 0..N-1")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("gradwatch").setLevel(logging.CRITICAL)
    torch.set_num_threads(1)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    results = []
    t0 = time.perf_counter()
    for s in chosen:
        for seed in range(args.seeds):
            r = run(s, seed=seed)
            results.append(r)
            if args.verbose:
                print(
                    f"--- {s.name} seed {seed} ({r.steps} steps, {r.seconds:.1f}s, val_loss {r.val_loss:.3f} "
                    f"acc {r.val_acc:.3f})"
                )
            for f in r.findings:
                print(f"    {f}")
    print(table(results))
    print(f"({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} thread)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
