"""``gradwatch.Watch`` in plain PyTorch and Fabric loops: same findings and actions as the Trainer callback."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from models import DigitsMLP, digits_loaders, trainer

import gradwatch
from gradwatch.remedies import SkipStep

NAN_AT, SPIKE_AT, EPOCHS = 12, 40, 3


class FaultyMLP(DigitsMLP):
    """DigitsMLP with a NaN batch and, at ``spike_at``, the loss times 50 (a gradient and a loss spike)."""

    def __init__(self, spike_at: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.spike_at = spike_at

    def loss_at(self, batch, step: int) -> torch.Tensor:
        x, y = batch
        if self.hparams.nan_at_step == step:
            x = torch.full_like(x, math.nan)
        loss = F.cross_entropy(self(x), y)
        return loss * 50 if step == self.spike_at else loss

    def training_step(self, batch, batch_idx):
        return self.loss_at(batch, self.global_step)


def accuracy(model, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    model.train()
    return hits / len(loader.dataset)


def plain_loop(model, loaders, watch_kw=None, tmp_path=None):
    """The loop a user writes: zero_grad, forward, backward, watch.step (or optimizer.step)."""
    torch.manual_seed(0)
    opt = model.configure_optimizers()
    watch = gradwatch.Watch(model, opt, **watch_kw) if watch_kw is not None else None
    step = 0
    for epoch in range(EPOCHS):
        for batch in loaders[0]:
            opt.zero_grad()
            loss = model.loss_at(batch, step)
            loss.backward()
            if watch is not None:
                watch.step(loss, epoch=epoch)
            else:
                opt.step()
            step += 1
    if watch is not None:
        watch.close()
    return watch


def test_plain_loop_recovers_like_the_trainer(tmp_path):
    torch.manual_seed(0)
    trained = FaultyMLP(nan_at_step=NAN_AT, spike_at=SPIKE_AT)
    torch.manual_seed(0)
    plain = FaultyMLP(nan_at_step=NAN_AT, spike_at=SPIKE_AT)
    assert all(torch.equal(a, b) for a, b in zip(trained.parameters(), plain.parameters(), strict=True))

    monitor = gradwatch.HealthMonitor(print_summary=False, events_path=tmp_path / "trainer.jsonl")
    torch.manual_seed(0)
    trainer(tmp_path / "tr", [monitor], max_epochs=EPOCHS, limit_val_batches=0).fit(
        trained, digits_loaders()[0]
    )
    loaders = digits_loaders()  # a fresh generator: the same batches in the same order
    watch = plain_loop(plain, loaders, {"log_dir": tmp_path / "plain", "print_summary": False})

    # same findings (rule, step) and the same actions (remedy, step) as under the Trainer
    assert [(f.rule, f.step) for f in watch.findings] == [(f.rule, f.step) for f in monitor.findings]
    assert [(a.remedy, a.step) for a in watch.actions] == [(a.remedy, a.step) for a in monitor.actions]
    rules = {f.rule: f.step for f in watch.findings}
    assert rules["nonfinite"] == NAN_AT and rules["gradient_spike"] == SPIKE_AT
    for ours, theirs in zip(watch.findings, monitor.findings, strict=True):  # the same numbers, too
        assert ours.evidence == pytest.approx(theirs.evidence, rel=1e-4, nan_ok=True)
    # the default decides at the read: the NaN step is rolled back there (SkipStep(mode="deferred"))
    assert ("rollback", NAN_AT) in [(a.remedy, a.step) for a in watch.actions]
    assert any(a.remedy == "clip_gradients" and SPIKE_AT in a.detail["steps"] for a in watch.actions)
    assert all(torch.isfinite(p).all() for p in plain.parameters())

    # the events file, in the same place relative to log_dir, with the same records
    events = [json.loads(line) for line in (tmp_path / "plain" / "gradwatch" / "events.jsonl").open()]
    reference = [json.loads(line) for line in (tmp_path / "trainer.jsonl").open()]
    assert [e["kind"] for e in events] == [e["kind"] for e in reference]
    assert events[-1]["kind"] == "summary" and events[-1]["status"] == "finished"

    # TensorBoard: the same scalar tags and text tags as the Trainer's logger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb_plain = EventAccumulator(str(tmp_path / "plain")).Reload().Tags()
    tb_trainer = EventAccumulator(str(tmp_path / "tr" / "tb" / "version_0")).Reload().Tags()
    gw = {t for t in tb_trainer["scalars"] if t.startswith("gradwatch/")}
    assert gw and gw == set(tb_plain["scalars"])
    assert set(tb_plain["tensors"]) == set(tb_trainer["tensors"])  # findings/actions text, custom scalars
    assert "gradwatch/findings/text_summary" in tb_plain["tensors"]
    # rows are thinned to log_every_n_steps, but every step a remedy touched has its row
    rows = EventAccumulator(str(tmp_path / "tr" / "tb" / "version_0"), size_guidance={"scalars": 0}).Reload()
    steps = {e.step for e in rows.Scalars("gradwatch/grad_norm/total")}
    touched = {a.step for a in monitor.actions} | {
        s for a in monitor.actions if a.remedy == "clip_gradients" for s in a.detail["steps"]
    }
    assert {NAN_AT, SPIKE_AT} <= touched <= steps

    # it recovers: accuracy close to the same loop without the faults, not watched
    torch.manual_seed(0)
    clean = FaultyMLP()
    plain_loop(clean, digits_loaders())
    # the rollback loses at most every_n_steps plus the snapshot interval (20 + 20 steps by default)
    (rollback,) = [a for a in watch.actions if a.remedy == "rollback"]
    assert 0 <= NAN_AT - rollback.detail["restored_step"] <= 40
    assert accuracy(plain, loaders[1]) > accuracy(clean, loaders[1]) - 0.1 > 0.8


def test_fabric_loop_gives_the_plain_loops_findings(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(0)
    model = FaultyMLP(nan_at_step=NAN_AT, spike_at=SPIKE_AT)
    opt = model.configure_optimizers()
    fmodel, fopt = fabric.setup(model, opt)
    loaders = digits_loaders()
    with gradwatch.Watch(fmodel, fopt, log_dir=tmp_path, print_summary=False) as watch:
        step = 0
        for _ in range(2):
            for batch in fabric.setup_dataloaders(loaders[0]):
                fopt.zero_grad()
                loss = model.loss_at(batch, step)
                fabric.backward(loss)
                watch.step(loss)
                step += 1
    assert watch.monitor.setup["loop"] == "fabric"
    found = [(f.rule, f.step) for f in watch.findings]
    assert found[0] == ("nonfinite", NAN_AT) and ("gradient_spike", SPIKE_AT) in found
    assert watch.findings[0].layer == "net.0"  # the user's module names, not Fabric's wrapper's
    assert ("rollback", NAN_AT) in [(a.remedy, a.step) for a in watch.actions]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert (tmp_path / "gradwatch" / "events.jsonl").exists()


def test_fabric_fp16_norms_are_unscaled(tmp_path):
    """Fabric's own 16-mixed GradScaler: gradwatch unscales before measuring (Fabric's wrapper then steps
    and updates the scaler without unscaling twice), so the norms are the true ones, not x65536."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    torch.manual_seed(0)
    model = FaultyMLP()
    fmodel, fopt = fabric.setup(model, model.configure_optimizers())
    before = [p.detach().clone() for p in model.parameters()]
    checked = 0
    with gradwatch.Watch(fmodel, fopt, every_n_steps=1, remedies="off", print_summary=False) as watch:
        assert watch.monitor.setup["scaler"] == "GradScaler (Fabric)"
        for step, batch in enumerate(fabric.setup_dataloaders(digits_loaders()[0])):
            if step == 12:
                break
            fopt.zero_grad()
            with fabric.autocast():
                loss = model.loss_at(batch, step)
            fabric.backward(loss)
            scale = scaler.get_scale()
            watch.step(loss)
            # unscale_ works in place: the gradients the optimizer used are the unscaled ones
            ref = math.sqrt(
                sum(torch.linalg.vector_norm(p.grad.float()).item() ** 2 for p in model.parameters())
            )
            rec = watch.monitor.last_stats.steps[-1]
            if math.isfinite(ref) and rec.loss_scale == scale:
                assert rec.grad_norm == pytest.approx(ref, rel=1e-4)
                checked += 1
    assert checked >= 10 and ref < 100  # scaled norms would be ~65536x larger
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it trained


def test_both_lightning_namespaces(tmp_path, loaders):
    import lightning.pytorch as L
    import pytorch_lightning as pl

    import gradwatch.lightning

    assert isinstance(gradwatch.HealthMonitor(), pl.Callback)
    new = gradwatch.lightning.HealthMonitor(print_summary=False, every_n_steps=5)
    assert isinstance(new, L.Callback) and not isinstance(new, pl.Callback)

    class Model(L.LightningModule):  # lightning.pytorch's Trainer takes lightning.pytorch modules only
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step == 3:
                x = torch.full_like(x, math.nan)
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer_ = L.Trainer(
        max_steps=10,
        accelerator="cpu",
        logger=L.loggers.TensorBoardLogger(str(tmp_path)),
        callbacks=new,  # a single callback: Lightning's own isinstance check must accept it
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer_.fit(Model(), loaders[0])
    # the rule's findings (the gradients at 3, the weights at the read at 5), then the leak's: the NaN step
    # went through, and that read rolled it back
    assert [(f.rule, f.step) for f in new.findings] == [("nonfinite", 3), ("nonfinite", 5), ("nonfinite", 3)]
    assert "were applied" in new.findings[2].message
    assert [(a.remedy, a.step) for a in new.actions] == [("rollback", 3)]  # decided at the read
    assert new.events_path.startswith(str(tmp_path))


def test_context_manager_marks_a_failed_run_and_state_round_trips(tmp_path, loaders):
    model = DigitsMLP()
    opt = model.configure_optimizers()
    with pytest.raises(RuntimeError, match="data loader broke"):
        with gradwatch.Watch(model, opt, events_path=tmp_path / "ev.jsonl", every_n_steps=4) as watch:
            for i, (x, y) in enumerate(loaders[0]):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                watch.step(loss)
                if i == 5:
                    state = watch.state_dict()
                    raise RuntimeError("data loader broke")
    assert watch.summary["status"] == "failed" and not watch.monitor.hooks_attached
    assert model._forward_pre_hooks == {}  # the watch's pre-hook is gone
    last = json.loads((tmp_path / "ev.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "summary" and last["status"] == "failed"
    with pytest.raises(RuntimeError, match="after Watch.close"):
        watch.step()

    resumed = gradwatch.Watch(model, opt, every_n_steps=4, print_summary=False)
    resumed.load_state_dict(state)
    assert resumed.global_step == 6 and resumed.monitor.steps_seen == 6
    resumed.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "sgd"}, "optimizer got 'sgd'"),
        ({"remedies": ["skip_stp"]}, "Did you mean 'skip_step'"),
        ({"log_dir": 3}, "log_dir must be a path"),
        ({"scheduler": "plateau"}, "ReduceLROnPlateau needs a metric"),
        ({"log_every_n_steps": 0}, r"log_every_n_steps must be a positive int, got 0\. Write e\.g\."),
        ({"probe_every_n_steps": "often"}, r"probe_every_n_steps must be a positive int, got 'often'"),
    ],
)
def test_bad_arguments_say_what_to_write(kwargs, match):
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if kwargs.get("scheduler") == "plateau":
        kwargs["scheduler"] = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    kw = {"optimizer": opt, **kwargs}
    with pytest.raises(gradwatch.ConfigError, match=match):
        gradwatch.Watch(model, **kw)


def test_grad_scaler_skips_the_inf_step_and_gradwatch_counts_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    with gradwatch.Watch(model, opt, every_n_steps=5, print_summary=False) as watch:
        for step in range(10):
            x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
            if step == 4:
                x[0, 0] = math.inf
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            watch.step(loss, scaler=scaler)
    assert [(f.rule, f.step) for f in watch.findings] == [("nonfinite", 4)]
    assert watch.actions == []  # the scaler skipped the step itself; skip_step stands aside
    assert watch.monitor.setup["scaler"] == "GradScaler"
    assert scaler.get_scale() == 2.0**15  # backed off once
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plain_loop_with_a_fused_adam_skips_on_the_device_flag(tmp_path):
    """watch.step arms the fused optimizer's found_inf before its step and disarms it after: the NaN step
    leaves weights and Adam state bit-identical, and the skip is logged at the next read."""

    class FusedMLP(FaultyMLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1, fused=True)

    model = FusedMLP(nan_at_step=5)
    opt = model.configure_optimizers()
    watch = gradwatch.Watch(model, opt, log_dir=tmp_path, every_n_steps=4, print_summary=False)
    for step, batch in zip(range(10), digits_loaders()[0], strict=False):
        opt.zero_grad()
        loss = model.loss_at(batch, step)
        loss.backward()
        if step == 5:
            before = [p.detach().clone() for p in model.parameters()]
            state = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
        watch.step(loss)
        if step == 5:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
            after = opt.state[next(model.parameters())]
            assert all(torch.equal(state[k], after[k]) for k in state)
            assert "found_inf" not in vars(opt)
    assert watch.monitor.skip.on_device(watch.monitor.context.optimizers(), 1, 1024)  # the device path
    watch.close()
    assert [(a.remedy, a.step) for a in watch.actions if a.remedy == "skip_step"] == [("skip_step", 5)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_grad_scaler_after_device_skips_keeps_its_own_flag():
    """The disarming post-hook stays on the optimizer for the run; a GradScaler that arms the same fused
    optimizer with its own found_inf later (given to ``watch.step``) must find its flag where it put it."""
    model = DigitsMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    watch = gradwatch.Watch(model, opt, every_n_steps=4, remedies=["skip_step"], print_summary=False)
    scaler = torch.amp.GradScaler("cpu")
    for step, (x, y) in zip(range(6), digits_loaders()[0], strict=False):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if step < 3:  # no scaler: skip_step's own flag, disarmed after each step
            loss.backward()
            watch.step(loss)
        else:  # the scaler's flag, for the scaler to remove
            scaler.scale(loss).backward()
            watch.step(loss, scaler=scaler)
        assert "found_inf" not in vars(opt) and "grad_scale" not in vars(opt)
    watch.close()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skips_before_a_rollback_in_the_same_read_do_not_escalate_again():
    """Corrupted weights (a value whose square overflows) give NaN gradients until one rollback restores
    them. Decided on device, the later skipped steps of the same read were computed with the replaced
    weights: they must not escalate a second time (one rollback, one LR cut, as on the per-step path)."""
    outcome = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        watch = gradwatch.Watch(
            model,
            opt,
            remedies=[SkipStep(mode="exact"), "rollback"],  # not fused: the per-step path to match
            every_n_steps=20,
            snapshot_every=5,
            print_summary=False,
            tensorboard=False,
            activations=False,
        )
        x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
        for step in range(45):
            if step == 21:
                with torch.no_grad():
                    model[0].weight[0, 0] = 3e38
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            watch.step(loss)
        watch.close()
        outcome[fused] = (sum(a.remedy == "rollback" for a in watch.actions), watch.monitor.lr.multiplier)
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert outcome[True] == outcome[False] == (1, 0.5), outcome
