"""gradwatch observes correctly under manual optimization, several optimizers and param groups, every common
LR scheduler and torch.compile; each on a real fit compared with an obvious reference."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, trainer
from torch import nn

import gradwatch
from gradwatch.probes.layout import layer_of
from gradwatch.setups import describe_setup, needs_automatic_loop_message


class Records(pl.Callback):
    """Listed after the monitor: every StepRecord gradwatch judged, and the reference gradient and lr."""

    def __init__(self, mon: gradwatch.HealthMonitor) -> None:
        self.mon = mon
        self.records = []
        self.sq: dict[int, float] = {}  # global_step of the batch's first optimizer step -> sum of squares
        self.layers: dict[int, dict[str, float]] = {}
        self.lr: dict[int, float] = {}
        self.first_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_step = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.first_step is None:
            self.first_step = trainer.global_step
            self.lr[self.first_step] = optimizer.param_groups[0]["lr"]
        mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
        layers = self.layers.setdefault(self.first_step, {})
        for name, p in pl_module.named_parameters():
            if id(p) in mine and p.grad is not None:
                n = torch.linalg.vector_norm(p.grad.double()).item()
                layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + n * n
        self.sq[self.first_step] = sum(layers.values())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = self.mon.monitor.last_stats
        if s is not None and (not self.records or self.records[-1].step != s.steps[-1].step):
            self.records.extend(s.steps)


# ---------------------------------------------------------------------------- manual optimization
class ManualMLP(DigitsMLP):
    """Manual optimization: training_step calls zero_grad / manual_backward / step and returns the loss."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()  # Lightning calls on_before_optimizer_step in here: gradwatch measures
        return loss  # gradwatch records the returned loss (a tensor, or a dict with "loss")


def test_manual_optimization_is_observed(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = Records(mon)
    trainer(tmp_path, [mon, ref], max_steps=6, logger=False).fit(ManualMLP(nan_at_step=4), loaders[0])
    assert mon.monitor.setup["manual_optimization"] is True
    assert [r.step for r in ref.records] == [0, 1, 2, 3, 4, 5]
    for rec in ref.records[:4]:
        assert rec.grad_norm == pytest.approx(math.sqrt(ref.sq[rec.step]), rel=1e-5)
        assert rec.loss is not None and math.isfinite(rec.loss)
    assert (mon.findings[0].rule, mon.findings[0].severity, mon.findings[0].step) == (
        "nonfinite",
        "critical",
        4,
    )
    msg = needs_automatic_loop_message("skip_step", mon.monitor.setup)
    assert msg is not None and "manual optimization" in msg


class GAN(pl.LightningModule):
    """A small GAN on digits: two optimizers stepped by hand, discriminator first (Lightning counts both)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64), nn.Sigmoid())
        self.disc = nn.Sequential(nn.Linear(64, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), 16)
        fake = self.gen(z)
        ones, zeros = torch.ones(len(real), 1), torch.zeros(len(real), 1)
        d_loss = F.binary_cross_entropy_with_logits(
            self.disc(real), ones
        ) + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.disc(fake), ones)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        return {"loss": g_loss.detach()}

    def configure_optimizers(self):
        return [
            torch.optim.Adam(self.gen.parameters(), lr=1e-3),
            torch.optim.Adam(self.disc.parameters(), lr=2e-4),
        ]


def test_two_optimizers_in_manual_optimization(tmp_path, loaders):
    """Both optimizers' gradients count in the batch's step (sums of squares add up), per layer too."""
    mon = gradwatch.HealthMonitor(every_n_steps=2, remedies="off")
    ref = Records(mon)
    trainer(tmp_path, [mon, ref], max_steps=8, logger=False).fit(GAN(), loaders[0])
    setup = mon.monitor.setup
    assert setup["num_optimizers"] == 2 and setup["manual_optimization"] is True
    # Lightning counts each optimizer.step(): the batch's step is the first one's global_step
    assert [r.step for r in ref.records] == [0, 2, 4, 6]
    for rec in ref.records:
        assert rec.grad_norm == pytest.approx(math.sqrt(ref.sq[rec.step]), rel=1e-5)
        assert rec.lr == pytest.approx(2e-4)  # the first optimizer stepped in the batch: the discriminator
    last = mon.monitor.last_stats
    assert set(last.grad_norm) == {"gen.0", "gen.2", "disc.0", "disc.2"}
    for layer, sq in ref.layers[6].items():
        assert last.grad_norm[layer] == pytest.approx(math.sqrt(sq), rel=1e-5)


class TwoGroups(DigitsMLP):
    def configure_optimizers(self):
        return torch.optim.SGD(
            [
                {"params": list(self.net.parameters()), "lr": 0.1},
                {"params": self.head.parameters(), "lr": 0.01},
            ],
            momentum=0.9,
        )


def test_one_optimizer_with_two_param_groups(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = Records(mon)
    trainer(tmp_path, [mon, ref], max_steps=3, logger=False).fit(TwoGroups(), loaders[0])
    assert mon.monitor.setup["param_groups"] == [2]
    for rec in ref.records:
        assert rec.grad_norm == pytest.approx(math.sqrt(ref.sq[rec.step]), rel=1e-5)
        assert rec.lr == pytest.approx(0.1)  # the first group's
    assert mon.monitor.last_stats.grad_norm["head"] == pytest.approx(
        math.sqrt(ref.layers[2]["head"]), rel=1e-5
    )


# ---------------------------------------------------------------------------- LR schedulers
SCHEDULERS = {
    "StepLR": (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5), "step"),
    "CosineAnnealingLR": (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6), "step"),
    "OneCycleLR": (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10), "step"),
    "LambdaLR": (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)), "step"),
    "ReduceLROnPlateau": (
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, factor=0.5, patience=0, threshold=100.0, threshold_mode="abs"
        ),
        "epoch",
    ),
}


class Scheduled(DigitsMLP):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        make, interval = SCHEDULERS[self.kind]
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": make(opt), "interval": interval, "monitor": "train_loss"},
        }


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_recorded_lr_follows_the_scheduler(tmp_path, loaders, kind):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = Records(mon)
    trainer(tmp_path, [mon, ref], max_epochs=3, limit_train_batches=3, logger=False).fit(
        Scheduled(kind), loaders[0]
    )
    assert mon.monitor.setup["lr_schedulers"] == [kind]
    got = [r.lr for r in ref.records]
    assert len(got) == 9
    assert got == pytest.approx([ref.lr[r.step] for r in ref.records], rel=1e-12)
    assert len(set(got)) > 1, f"{kind} never changed the lr: {got}"


# ---------------------------------------------------------------------------- torch.compile
class Compiled(pl.LightningModule):
    """The network is compiled inside the LightningModule (gradwatch's hooks attach to its submodules)."""

    def __init__(self, backend):
        super().__init__()
        self.net = torch.compile(
            nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), backend=backend, dynamic=False
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_compiled_model_no_graph_breaks(tmp_path, loaders):
    """gradwatch's probes (gradients, weights, activation hooks) cause no graph break, and activation
    statistics of compiled submodules are read on scheduled steps (hooks registered before compilation,
    gated by an attribute dynamo guards on: two graphs, each compiled once)."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounter()
    mon = gradwatch.HealthMonitor(every_n_steps=3, remedies="off")

    class Linear0(Records):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            lin = pl_module.net._orig_mod[0]
            with torch.no_grad():  # eager, outside the compiled graph (and not through the hooked module)
                self.linear0_mean = F.linear(batch[0], lin.weight, lin.bias).mean().item()

    ref = Linear0(mon)
    model = Compiled(cnt)
    trainer(tmp_path, [mon, ref], max_steps=7, logger=False).fit(model, loaders[0])
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert cnt.frame_count <= 3, cnt.frame_count  # plain forward, forward with hooks: no per-step recompile
    assert describe_setup(pl.Trainer(logger=False), model)["compiled"] is True
    acts = mon.monitor.last_stats.activations  # read inside the compiled graph, on scheduled steps
    assert set(acts) == {"net._orig_mod.0", "net._orig_mod.1", "net._orig_mod.2"}
    assert acts["net._orig_mod.0"].mean == pytest.approx(ref.linear0_mean, rel=1e-5)
    for rec in ref.records:
        assert rec.grad_norm == pytest.approx(math.sqrt(ref.sq[rec.step]), rel=1e-5)
    torch._dynamo.reset()
