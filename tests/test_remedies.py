"""Remedies on real fits: each changes exactly what it says, and nothing else."""

from __future__ import annotations

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, digits_loaders, trainer
from torch import nn

import gradwatch
from gradwatch.detectors import DeadUnits, Detector, NonFinite
from gradwatch.findings import Finding
from gradwatch.remedies import ClipGradients, Context, EarlyStop, ReduceLR, Reinitialize, Rollback, SkipStep


class FireAt(Detector):
    """A real detector plugin that reports ``rule`` at given steps: a deterministic trigger for remedies."""

    def __init__(self, rule: str, steps: set[int], severity: str = "warning", **evidence: float) -> None:
        self.fire_rule, self.steps, self.severity, self.evidence = rule, set(steps), severity, evidence

    def check(self, step, stats):
        return [
            Finding(self.fire_rule, self.severity, r.step, r.epoch, None, "scripted", dict(self.evidence), "")
            for r in stats.steps
            if r.step in self.steps
        ]


def state_of(module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": copy.deepcopy(module.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}


def assert_same(a, b, path="") -> None:
    """Bit-identical nested state (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (path, a, b)


class BNNet(DigitsMLP):
    """AdamW with weight decay, a BatchNorm layer and a LambdaLR schedule: everything a skipped step could touch."""

    def __init__(self, nan_at_step=None):
        super().__init__(nan_at_step=nan_at_step)
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()
        )

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_skip_step_leaves_weights_and_optimizer_state_bit_identical(tmp_path, loaders, precision):
    nan = 5
    seen = {}

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == nan:
                seen["before"] = state_of(pl_module, trainer.optimizers[0])
                seen["lr_before"] = trainer.optimizers[0].param_groups[0]["lr"]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == nan + 1:
                seen["after"] = state_of(pl_module, trainer.optimizers[0])
                seen["grads"] = [p.grad for p in pl_module.parameters()]
                seen["lr_after"] = trainer.optimizers[0].param_groups[0]["lr"]

    mon = gradwatch.HealthMonitor(every_n_steps=4, remedies=["skip_step"])
    model = BNNet(nan_at_step=nan)
    trainer(tmp_path, [mon, Capture()], max_steps=10, logger=False, precision=precision).fit(
        model, loaders[0]
    )
    after = seen["after"]
    # the optimizer's step was a no-op: weights, BatchNorm statistics, moments, step counts, weight decay
    assert_same(seen["before"]["model"], after["model"])
    before_opt, after_opt = seen["before"]["optimizer"], after["optimizer"]
    assert_same(before_opt["state"], after_opt["state"])
    assert all(g is None for g in seen["grads"])  # nothing leaks into the next step
    assert seen["lr_after"] == pytest.approx(
        seen["lr_before"] * (nan + 1) / (nan + 2)
    )  # the scheduler kept time
    (skip,) = [a for a in mon.actions if a.remedy == "skip_step"]
    assert (skip.step, skip.rule, skip.detail["optimizer_step"]) == (nan, "nonfinite", "skipped")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [f.step for f in mon.findings if f.rule == "nonfinite"] == [nan]


def test_skip_step_under_accumulation_skips_the_whole_window(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies=["skip_step"])
    model = DigitsMLP(nan_at_step=2, optimizer="adam", lr=1e-3)
    trainer(tmp_path, [mon], max_steps=5, logger=False, accumulate_grad_batches=2).fit(model, loaders[0])
    assert [a.step for a in mon.actions] == [2]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(r.grad_norm) for r in mon.monitor.last_stats.steps)  # step 4: clean gradients


def _lrs(tmp_path, loaders, sched: str, remedies, detectors, steps=30, ckpt=None, callbacks=(), **kw):
    class Sched(DigitsMLP):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            s = {
                "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 10)),
                "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
                "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
            }[sched]()
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}

    lrs: dict[int, float] = {}

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs[trainer.global_step] = optimizer.param_groups[0]["lr"]

    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies=remedies, detectors=detectors)
    t = trainer(tmp_path, [mon, Record(), *callbacks], max_steps=steps, max_epochs=-1, logger=False, **kw)
    t.fit(Sched(), loaders[0], ckpt_path=ckpt)
    return lrs, mon


@pytest.mark.parametrize("sched", ["lambda", "cosine", "step"])
def test_reduce_lr_survives_the_scheduler(tmp_path, loaders, sched):
    plain, _ = _lrs(tmp_path, loaders, sched, "off", [])
    reduced, mon = _lrs(
        tmp_path, loaders, sched, [ReduceLR(factor=0.5)], [FireAt("exploding_gradients", {12})]
    )
    (action,) = mon.actions
    assert (action.remedy, action.step, action.detail["multiplier_after"]) == ("reduce_lr", 12, 0.5)
    assert action.detail["lr_after"] == pytest.approx(0.5 * action.detail["lr_before"])
    for k in plain:  # read at step 15: from step 16 on, the schedule's own shape, halved
        assert reduced[k] == pytest.approx(plain[k] * (0.5 if k > 15 else 1.0), rel=1e-9), k


def test_reduce_lr_state_survives_checkpoint_and_resume(tmp_path, loaders):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), every_n_train_steps=20, save_top_k=-1)
    plain, _ = _lrs(tmp_path, loaders, "lambda", "off", [], steps=30)
    _, mon = _lrs(
        tmp_path,
        loaders,
        "lambda",
        [ReduceLR(factor=0.5)],
        [FireAt("exploding_gradients", {12})],
        steps=20,
        callbacks=[ckpt],
        enable_checkpointing=True,
    )
    path = str(tmp_path / "ck" / "epoch=0-step=20.ckpt")
    resumed, mon2 = _lrs(
        tmp_path,
        loaders,
        "lambda",
        [ReduceLR(factor=0.5)],
        [FireAt("exploding_gradients", set())],
        steps=30,
        ckpt=path,
    )
    assert mon2.monitor.lr.multiplier == 0.5 and mon2.monitor.remedies[0].used == 1
    for k in range(20, 30):
        assert resumed[k] == pytest.approx(plain[k] * 0.5, rel=1e-9), k


def test_rollback_restores_exactly(tmp_path, loaders):
    kept = {}

    class Capture(pl.Callback):  # after the monitor: sees the state right after a read's snapshot
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step - 1
            if step in (20, 40):
                kept[step] = state_of(pl_module, trainer.optimizers[0])
                kept[step]["sched"] = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())
            if step == 45:
                kept["after"] = state_of(pl_module, trainer.optimizers[0])
                kept["after"]["sched"] = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())

    class Sched(DigitsMLP):
        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            s = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}

    mon = gradwatch.HealthMonitor(
        every_n_steps=5,
        snapshot_every=20,
        remedies=[Rollback(divergence_lr_factor=1.0, margin=10)],
        detectors=[FireAt("divergence", {45}, grad_ratio=3.0)],  # gradients rose with the loss
    )
    trainer(tmp_path, [mon, Capture()], max_steps=50, max_epochs=-1, logger=False).fit(Sched(), loaders[0])
    (action,) = mon.actions
    assert (action.remedy, action.detail["restored_step"]) == (
        "rollback",
        20,
    )  # 40 is within the margin of 45
    assert_same(kept[20]["model"], kept["after"]["model"])
    assert_same(kept[20]["optimizer"], kept["after"]["optimizer"])
    # the schedule is not rewound: it follows the optimizer steps the run took (46 by then)
    assert kept["after"]["sched"]["last_epoch"] == 46
    assert mon.monitor.snapshots.peak_bytes > 0


def test_reinitialize_resets_exactly_the_dead_units_optimizer_state(tmp_path, loaders):
    seen = {}

    class Before(pl.Callback):  # listed before the monitor: the state just before its read at step 10
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step - 1 == 5:
                seen["before"] = state_of(pl_module, trainer.optimizers[0])

    class After(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step - 1 == 5:
                seen["after"] = state_of(pl_module, trainer.optimizers[0])

    model = DigitsMLP(optimizer="adam", lr=1e-3)
    with torch.no_grad():
        model.net[0].bias[:40] = -20.0  # 40 of 64 first-layer units can never fire
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies=[Reinitialize()], detectors=[DeadUnits()])
    trainer(tmp_path, [Before(), mon, After()], max_steps=12, logger=False).fit(model, loaders[0])
    (action,) = mon.actions  # dead on the checks at steps 0 and 5: acted at 5
    assert (action.remedy, action.step, action.detail["layer"]) == ("reinitialize", 5, "net.0")
    b, a = seen["before"], seen["after"]
    dead = (b["model"]["net.0.weight"] != a["model"]["net.0.weight"]).any(
        dim=1
    )  # rows that got fresh weights
    assert dead[:40].all() and dead.sum() == action.detail["units"] < 64
    assert (a["model"]["net.0.bias"][dead] == 0).all()
    assert torch.equal(a["model"]["net.0.bias"][~dead], b["model"]["net.0.bias"][~dead])
    assert (a["model"]["net.2.weight"][:, dead] == 0).all()  # zero outgoing weights (ReDo)
    names = [n for n, _ in model.named_parameters()]
    ia, ib = a["optimizer"]["state"], b["optimizer"]["state"]
    for i, name in enumerate(names):
        for key in ("exp_avg", "exp_avg_sq"):
            new, old = ia[i][key], ib[i][key]
            if name in ("net.0.weight", "net.0.bias"):
                assert (new[dead] == 0).all() and torch.equal(new[~dead], old[~dead]), (name, key)
            elif name == "net.2.weight":
                assert (new[:, dead] == 0).all() and torch.equal(new[:, ~dead], old[:, ~dead]), (name, key)
            else:
                assert torch.equal(new, old), (name, key)  # everything else untouched
        assert torch.equal(ia[i]["step"], ib[i]["step"])


def test_early_stop_restores_the_best_weights(tmp_path):
    from sklearn.datasets import load_digits
    from torch.utils.data import DataLoader, TensorDataset

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    train = DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=512)
    snapshots = {}

    class Keep(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            snapshots[trainer.global_step - 1] = (
                float(trainer.callback_metrics["val_loss"]),
                copy.deepcopy(pl_module.state_dict()),
            )

    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies=[EarlyStop()])
    model = DigitsMLP(optimizer="adam", lr=3e-3, hidden=(512, 512))
    t = trainer(tmp_path, [Keep(), mon], max_epochs=80)
    t.fit(model, train, val)
    (action,) = mon.actions
    assert action.remedy == "early_stop" and t.should_stop and t.current_epoch < 79
    best_step = min(snapshots, key=lambda s: snapshots[s][0])
    assert action.detail["best_step"] == best_step
    assert_same(snapshots[best_step][1], model.state_dict())
    (metrics,) = t.validate(model, val, verbose=False)
    assert metrics["val_loss"] == pytest.approx(snapshots[best_step][0], rel=1e-5)


def test_remedies_off_acts_on_nothing(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off")
    model = DigitsMLP(nan_at_step=3)
    trainer(tmp_path, [mon], max_steps=10, logger=False).fit(model, loaders[0])
    assert mon.actions == [] and any(f.rule == "nonfinite" for f in mon.findings)
    assert not all(torch.isfinite(p).all() for p in model.parameters())  # the NaN went through


def test_ladder_spent_stops_with_a_critical_finding(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(
        every_n_steps=1,
        remedies=[SkipStep(budget=2), EarlyStop()],
        detectors=[NonFinite()],
    )

    class AlwaysNaN(DigitsMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x * (math.nan if self.global_step >= 2 else 1.0)), y)

    t = trainer(tmp_path, [mon], max_steps=50, max_epochs=-1, logger=False)
    t.fit(AlwaysNaN(), loaders[0])
    assert [a.remedy for a in mon.actions] == ["skip_step", "skip_step", "early_stop"]
    stop = mon.actions[-1]
    assert stop.detail["reason"] == "remedies exhausted" and stop.detail["skip_step"] == 2
    assert any(f.severity == "critical" and "remedies were spent" in f.message for f in mon.findings)
    assert t.global_step < 50


def test_remedies_work_under_manual_optimization(tmp_path, loaders):
    """The user steps the optimizer and the scheduler: skip_step and reduce_lr still act, and compose."""

    class Manual(DigitsMLP):
        def __init__(self):
            super().__init__(nan_at_step=3)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt, sched = self.optimizers(), self.lr_schedulers()
            x, y = batch
            if self.global_step == 3:
                x = torch.full_like(x, math.nan)
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            sched.step()
            return loss

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.1 * k))]

    lrs = {}

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    mon = gradwatch.HealthMonitor(
        every_n_steps=5,
        remedies=[SkipStep(), ReduceLR(factor=0.5)],
        detectors=[NonFinite(), FireAt("exploding_gradients", {7})],
    )
    model = Manual()
    trainer(tmp_path, [mon, Record()], max_steps=15, logger=False).fit(model, loaders[0])
    assert [(a.remedy, a.step) for a in mon.actions] == [("skip_step", 3), ("reduce_lr", 7)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for k in range(11, 15):  # read at step 10: from 11 on, the user's schedule, halved
        assert lrs[k] == pytest.approx(0.5 * 0.1 / (1 + 0.1 * k), rel=1e-9), k


def test_snapshot_cadence_default_is_time_budgeted_and_explicit_is_kept():
    """Default: every 20 steps at most, and copying <= 1% of the time; snapshot_every=N: every N steps."""
    ctx = Context(model=nn.Linear(4, 2))
    auto = gradwatch.HealthMonitor().monitor.snapshots
    explicit = gradwatch.HealthMonitor(snapshot_every=5).monitor.snapshots
    assert (auto.every_n_steps, auto.max_overhead) == (20, 0.01)
    assert (explicit.every_n_steps, explicit.max_overhead) == (5, None)
    for snaps in (auto, explicit):
        snaps.take(0, ctx)
        snaps.last_seconds = 60.0  # as if the copy had taken a minute
    assert not auto.due(100)  # the budget holds it back (4 hours of training per such copy)
    assert auto.due(100, timed=False)  # distributed: step cadence only, alike on every rank
    assert explicit.due(5) and not explicit.due(4)


def test_a_second_fit_never_restores_the_first_fits_state(tmp_path, loaders):
    """One monitor, two fits: snapshots, best weights and cooldowns belong to their own run."""

    class NaNs(DigitsMLP):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step in (12, 13, 14) and self.hparams.nan_at_step == 12:
                x = torch.full_like(x, math.nan)
            return F.cross_entropy(self(x), y)

    mon = gradwatch.HealthMonitor(every_n_steps=5, snapshot_every=5)
    trainer(tmp_path, [mon], max_steps=60, max_epochs=-1, logger=False).fit(NaNs(), loaders[0])
    assert mon.monitor.snapshots.ring and mon.monitor.snapshots.ring[-1].step >= 50
    second = NaNs(nan_at_step=12)
    trainer(tmp_path, [mon], max_steps=20, logger=False).fit(second, loaders[0])
    (rollback,) = [a for a in mon.actions if a.remedy == "rollback"]
    assert rollback.detail["restored_step"] <= 10  # this run's own healthy state, not step 55 of the first
    assert all(torch.isfinite(p).all() for p in second.parameters())


class FusedNet(DigitsMLP):
    """No buffers, one AdamW with weight decay (fused or not): NaN batches at ``nan_steps``."""

    def __init__(self, nan_steps=(), fused=True, optimizer_cls=torch.optim.AdamW):
        super().__init__()
        self.nan_steps, self.fused, self.optimizer_cls = set(nan_steps), fused, optimizer_cls

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step in self.nan_steps:
            x = torch.full_like(x, math.nan)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_cls is torch.optim.SGD:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, fused=self.fused)
        return self.optimizer_cls(self.parameters(), lr=1e-2, weight_decay=0.1, fused=self.fused)


def test_skip_step_with_a_fused_adam_decides_on_device(tmp_path, loaders):
    """One fused AdamW, no buffers: the optimizer gets GradScaler's ``found_inf`` flag and its kernel leaves
    weights, moments and step count as they were (bit for bit); the skip is logged at the next read."""
    nan, seen = 5, {}

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == nan:
                seen["before"] = state_of(pl_module, trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == nan + 1:
                seen["after"] = state_of(pl_module, trainer.optimizers[0])
                seen["armed"] = "found_inf" in vars(trainer.optimizers[0])

    mon = gradwatch.HealthMonitor(every_n_steps=4)
    model = FusedNet(nan_steps={nan})
    trainer(tmp_path, [mon, Capture()], max_steps=10, logger=False).fit(model, loaders[0])
    assert mon.monitor.skip.on_device(mon.monitor.context.optimizers(), 1, 1024)
    assert_same(seen["before"]["model"], seen["after"]["model"])
    assert_same(seen["before"]["optimizer"]["state"], seen["after"]["optimizer"]["state"])  # moments, step
    assert not seen["armed"]  # the flag was for that one step
    (skip,) = [a for a in mon.actions if a.remedy == "skip_step"]
    assert (skip.step, skip.rule, skip.detail["optimizer_step"]) == (nan, "nonfinite", "skipped")
    assert [f.step for f in mon.findings if f.rule == "nonfinite"] == [nan]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("nans", [(15, 18), (15, 40)], ids=["three", "persisting"])
def test_device_skips_escalate_like_the_per_step_path(tmp_path, loaders, nans):
    """Skipped steps escalate to rollbacks at the same steps whether decided on device and tallied at the
    read (fused) or read and decided per step (not fused): three in a row, and NaNs that persist through
    the rollback's cooldown (a rollback at every third skip once it is ready again)."""
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        # exact: the not-fused run decides every step, the path the device's tally must match
        mon = gradwatch.HealthMonitor(every_n_steps=10, remedies=[SkipStep(mode="exact"), "rollback"])
        model = FusedNet(nan_steps=set(range(*nans)), fused=fused)
        trainer(tmp_path, [mon], max_steps=nans[1] + 5, max_epochs=-1, logger=False).fit(model, loaders[0])
        runs[fused] = ([(a.remedy, a.step) for a in mon.actions], mon.monitor.lr.multiplier)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert runs[True] == runs[False]  # the same actions at the same steps, the same learning-rate cuts
    rollbacks = [s for r, s in runs[True][0] if r == "rollback"]
    assert rollbacks == ([17] if nans == (15, 18) else [17, 27, 37]), runs[True][0]


def test_a_checkpoint_between_device_skips_and_the_read_escalates_at_the_next_skip(tmp_path, loaders):
    """A checkpoint written after three device-decided skips and before the read holds the skips, and no
    rollback happens inside ``state_dict``; the next skipped step, tallied at the read, escalates."""
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=18, save_top_k=-1)
    mon = gradwatch.HealthMonitor(every_n_steps=10, remedies=["skip_step", "rollback"])
    model = FusedNet(nan_steps=set(range(15, 20)))
    trainer(tmp_path, [mon, ckpt], max_steps=22, logger=False, enable_checkpointing=True).fit(
        model, loaders[0]
    )
    (path,) = (tmp_path / "ckpt").glob("*step=18*.ckpt")
    saved = next(
        v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "HealthMonitor" in k
    )
    assert [(a["remedy"], a["step"]) for a in saved["actions"]] == [("skip_step", s) for s in (15, 16, 17)]
    acts = [(a.remedy, a.step) for a in mon.actions]
    assert acts == [*(("skip_step", s) for s in (15, 16, 17, 18)), ("rollback", 18), ("skip_step", 19)], acts


@pytest.mark.parametrize("case", ["fused_sgd", "adam_not_fused", "batchnorm", "small_budget", "cooldown"])
def test_the_skip_is_read_per_step_where_the_device_flag_would_be_wrong(case):
    """Fused SGD (uninitialised momentum on a skipped first step), an unfused group, buffers to put back,
    a budget or cooldown that must hold between reads: the per-step path."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)) if case == "batchnorm" else nn.Linear(4, 4)
    opt = {
        "fused_sgd": lambda: torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True),
        "adam_not_fused": lambda: torch.optim.Adam(model.parameters()),
    }.get(case, lambda: torch.optim.AdamW(model.parameters(), fused=True))()
    skip = SkipStep(
        budget=10 if case == "small_budget" else 1_000_000, cooldown_steps=5 if case == "cooldown" else 0
    )
    skip.bind(model)
    assert not skip.on_device([opt], 1, 1024)
    ok = SkipStep()
    ok.bind(nn.Linear(4, 4))
    assert ok.on_device([torch.optim.AdamW(nn.Linear(4, 4).parameters(), fused=True)], 1, 1024)
    assert not ok.on_device([torch.optim.AdamW(nn.Linear(4, 4).parameters(), fused=True)], 2, 1024)  # DDP


class _ZClipReference:
    """ZClip's rule written plainly in Python floats: the obvious reference for the device arithmetic."""

    def __init__(self, z: float = 2.5, alpha: float = 0.97, warmup_steps: int = 25) -> None:
        self.z, self.alpha, self.warmup = z, alpha, warmup_steps
        self.mean: float | None = None
        self.var, self.n = 0.0, 0

    def clip(self, norm: float) -> float:
        finite = math.isfinite(norm)
        if self.mean is None:
            if finite:
                self.mean, self.var, self.n = norm, 0.0, 1
            return 1.0
        coef, seen = 1.0, norm
        if self.n >= self.warmup:
            threshold = self.mean + self.z * math.sqrt(self.var)
            if finite and norm > threshold:
                coef = threshold / (norm + 1e-12)
            seen = min(norm, threshold)
        if finite:
            d = seen - self.mean
            self.mean += (1 - self.alpha) * d
            self.var = self.alpha * (self.var + (1 - self.alpha) * d * d)
            self.n += 1
        return coef


@pytest.mark.parametrize(
    "norms",
    [
        [
            math.nan,
            *(1.0 + 0.1 * torch.rand(40, generator=torch.Generator().manual_seed(0))).tolist(),
            9.0,
            math.inf,
            1.05,
            12.0,
        ],
        [math.nan, math.nan, math.inf, 1.0, 1.1, 1.2, 1.3],  # non-finite steps must not count towards warm-up
        [1.0, 1.1, math.nan, 1.2, 1.5, 1.0, math.nan, 4.0],
    ],
    ids=["long", "leading_nans", "nans_between"],
)
def test_clipping_arithmetic_matches_a_plain_reference_and_ignores_non_finite_steps(norms):
    """Both arithmetics (host floats, where skip_step read the squared norm; device ops, where nothing
    was read) clip the same steps by the same factors as ZClip's rule in plain Python; a non-finite step,
    first or later, neither starts, moves nor counts for the norm; handing over from one path to the
    other, or a checkpoint, carries the running statistics over."""
    warmup = 10 if len(norms) > 20 else 2
    reference = _ZClipReference(warmup_steps=warmup)
    host, device = ClipGradients(warmup_steps=warmup), ClipGradients(warmup_steps=warmup)
    for x in norms:
        expected = reference.clip(x)
        g_host, g_dev = [torch.full((3,), x)], [torch.full((3,), x)]
        c_host = host.clip(g_host, x * x)
        c_dev = float(device.clip(g_dev, torch.tensor(x * x, dtype=torch.float64)))
        assert c_host == pytest.approx(expected, rel=1e-9) and c_dev == pytest.approx(expected, rel=1e-9), x
        if math.isfinite(x):
            assert torch.allclose(g_dev[0], g_host[0], rtol=1e-6)
            assert torch.allclose(g_host[0], torch.full((3,), x * expected), rtol=1e-6)
    assert float(device._mean) == pytest.approx(reference.mean, rel=1e-9) == host._mean
    finite = sum(math.isfinite(x) for x in norms)
    assert reference.n == host.n == device.state_dict()["n"] == finite  # non-finite steps not counted
    resumed = ClipGradients(warmup_steps=warmup)
    resumed.load_state_dict(device.state_dict())
    for x, path in ((1.0, "device"), (2.0, "host"), (100.0, "device")):  # resumed, then hand-overs
        sq = torch.tensor(x * x, dtype=torch.float64) if path == "device" else x * x
        assert float(resumed.clip([torch.ones(1)], sq)) == pytest.approx(reference.clip(x), rel=1e-9), path
    assert resumed.state_dict()["n"] == finite + 3 == reference.n


def test_a_skipped_first_step_leaves_clipping_as_the_per_step_path_does(tmp_path, loaders):
    """A NaN first step, skipped on the device flag (fused) or per step (not fused): clipping starts from
    the first finite step either way."""
    clips = {}
    for fused in (True, False):
        torch.manual_seed(0)
        mon = gradwatch.HealthMonitor(every_n_steps=10, remedies=["skip_step", "clip_gradients"])
        trainer(tmp_path, [mon], max_steps=30, max_epochs=-1, logger=False).fit(
            FusedNet(nan_steps={0}, fused=fused),
            digits_loaders()[0],  # the same batches for both
        )
        clips[fused] = mon.monitor.clip
    fused, unfused = clips[True].state_dict(), clips[False].state_dict()
    assert fused["n"] == unfused["n"] == 29  # finite steps seen: the NaN step did not count
    assert fused["mean"] == pytest.approx(unfused["mean"], rel=0.1)  # fused and unfused AdamW differ a little


def test_the_device_flag_is_gone_right_after_the_step_it_was_for(tmp_path, loaders):
    """Manual optimization: a NaN step through Lightning's optimizer (skipped on the flag), then a finite
    step of the raw optimizer in the same batch, which no hook sees: that one must update the weights."""
    seen = {}

    class TwoSteps(FusedNet):
        def __init__(self):
            super().__init__(nan_steps={3})
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            bad = batch_idx == 3
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self(torch.full_like(x, math.nan) if bad else x), y))
            opt.step()  # through Lightning: gradwatch's hook arms the flag
            if bad:
                raw = opt.optimizer
                seen["armed_after_step"] = "found_inf" in vars(raw)
                before = [p.detach().clone() for p in self.parameters()]
                raw.zero_grad()
                self.manual_backward(F.cross_entropy(self(x), y))
                raw.step()  # no hook runs: the earlier flag must not skip it
                seen["updated"] = not all(
                    torch.equal(a, p) for a, p in zip(before, self.parameters(), strict=True)
                )

    mon = gradwatch.HealthMonitor(every_n_steps=4, remedies=["skip_step"])
    trainer(tmp_path, [mon], max_steps=6, logger=False).fit(TwoSteps(), loaders[0])
    assert seen == {"armed_after_step": False, "updated": True}
    assert [(a.remedy, a.step) for a in mon.actions] == [("skip_step", 3)]
    assert mon.monitor.skip.hooked == 0  # its step post-hook removed when the fit ended
