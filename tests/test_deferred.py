"""The default's non-finite protection costs no host sync per step, for every common optimizer.

``SkipStep(mode="deferred")`` (the default): a fused Adam/AdamW skips on the device flag; every other
optimizer takes the step, and the next read rolls a step whose non-finite gradients reached the weights
back to the newest snapshot taken before it. ``SkipStep(mode="exact")`` decides every step (one read).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from models import DigitsMLP, digits_loaders, trainer
from test_syncs import CountedMonitor

import gradwatch
from gradwatch.remedies import SkipStep

#: (name, factory): the optimizers the default must protect without a per-step sync.
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
    "adam_fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
}


class Net(DigitsMLP):
    def __init__(self, opt: str, **kw):
        super().__init__(**kw)
        self.opt = opt

    def configure_optimizers(self):
        return OPTIMIZERS[self.opt](self.parameters())


class HostReads(CountedMonitor):
    """Also counts ``Tensor.tolist``/``item``/``cpu`` calls made inside gradwatch's per-step hooks (which
    the dispatch counter cannot see on CPU tensors, where they wait for nothing)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads: Counter[int] = Counter()

    def _counted(self, hook, trainer, *args):
        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "cpu")}

        def counting(name):
            def read(t, *a, **k):
                self.reads[self.step] += 1
                return originals[name](t, *a, **k)

            return read

        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        try:
            return super()._counted(hook, trainer, *args)
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_default_reads_nothing_on_steps_between_reads(tmp_path, opt):
    """Default settings: no scalar sync and no tolist/item/cpu in gradwatch's per-step hooks on the steps
    between reads, and one stacked transfer on a scheduled step."""
    mon = HostReads(every_n_steps=5)
    torch.manual_seed(0)
    trainer(tmp_path, [mon], max_steps=20, logger=False).fit(Net(opt), digits_loaders()[0])
    between = [s for s in range(20) if s % 5]
    assert all(mon.syncs.get(s, 0) == 0 for s in between), mon.syncs
    assert all(mon.reads.get(s, 0) == 0 for s in between), mon.reads
    assert all(mon.reads.get(s, 0) >= 1 for s in range(0, 20, 5))  # the read (a .cpu())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_a_nan_step_between_reads_ends_in_finite_weights(tmp_path, opt):
    """A NaN batch at step 13 (between the reads at 10 and 20): fused Adam/AdamW skip it exactly on the
    device; every other optimizer has it rolled back at the read of step 20, to the snapshot of step 10
    (the documented bound: every_n_steps plus the snapshot interval). The run ends finite and says so."""
    mon = gradwatch.HealthMonitor(every_n_steps=10, snapshot_every=10, print_summary=False)
    torch.manual_seed(0)
    model = Net(opt, nan_at_step=13)
    trainer(tmp_path, [mon], max_steps=40, max_epochs=-1, logger=False).fit(model, digits_loaders()[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    acts = [(a.remedy, a.step) for a in mon.actions if a.remedy != "clip_gradients"]
    if opt.endswith("_fused"):
        assert acts == [("skip_step", 13)]
        return
    rollback = next(a for a in mon.actions if a.remedy == "rollback")
    assert rollback.step == 13 and rollback.detail["restored_step"] == 10  # lost: steps 11-20
    leaked = [f for f in mon.findings if f.rule == "nonfinite" and "were applied" in f.message]
    assert len(leaked) == 1 and leaked[0].step == 13 and leaked[0].severity == "critical"


def _watch_run(steps, nan_steps, every=10, optimizer=OPTIMIZERS["sgd_momentum"], **kw):
    """A plain loop (SGD with momentum unless told); NaN batches at ``nan_steps``. Returns (watch, model)."""
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = optimizer(model.parameters())
    x, y = next(iter(digits_loaders(batch_size=64)[0]))
    watch = gradwatch.Watch(model, opt, every_n_steps=every, snapshot_every=every, print_summary=False, **kw)
    for step in range(steps):
        opt.zero_grad()
        xs = torch.full_like(x, math.nan) if step in nan_steps else x
        torch.nn.functional.cross_entropy(model(xs), y).backward()
        watch.step()
    watch.close()
    return watch, model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_watch_plain_loop_ends_a_nan_step_finite(tmp_path, name):
    """The same in a plain loop with ``Watch``."""
    watch, model = _watch_run(30, {13}, optimizer=OPTIMIZERS[name])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    acts = [(a.remedy, a.step) for a in watch.actions if a.remedy != "clip_gradients"]
    if name.endswith("_fused"):
        assert acts == [("skip_step", 13)]
        return
    rollback = next(a for a in watch.actions if a.remedy == "rollback")
    assert (rollback.step, rollback.detail["restored_step"]) == (13, 10)


def test_exact_mode_skips_as_it_comes_at_one_read_per_step(tmp_path):
    """``SkipStep(mode="exact")`` keeps the per-step decision: the NaN step is skipped at once (no
    rollback), for one host read on every step."""
    mon = HostReads(every_n_steps=5, remedies=[SkipStep(mode="exact"), "rollback"])
    torch.manual_seed(0)
    trainer(tmp_path, [mon], max_steps=20, logger=False).fit(Net("sgd", nan_at_step=7), digits_loaders()[0])
    assert [(a.remedy, a.step) for a in mon.actions] == [("skip_step", 7)]
    assert all(mon.reads.get(s, 0) >= 1 for s in range(20))  # the decision's read, every step


def test_skip_step_mode_is_checked():
    with pytest.raises(gradwatch.ConfigError, match=r"mode=.*'deferred' or 'exact'.*Did you mean 'exact'"):
        SkipStep(mode="exakt")


def test_before_any_snapshot_the_step_is_decided_at_once():
    """A NaN at step 0, before the first read's snapshot: no rollback could undo it, so it is skipped
    as it comes (as with mode="exact"), and the run goes on finite instead of stopping."""
    watch, model = _watch_run(30, {0})
    assert [(a.remedy, a.step) for a in watch.actions if a.remedy != "clip_gradients"] == [("skip_step", 0)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_leak_keeps_the_lr_and_the_run_then_decides_every_step():
    """The first NaN step (13) is rolled back at the read with the learning rate kept; the run has shown
    it makes them, so the next one (step 25) is skipped as it comes; the state says so across a resume."""
    watch, model = _watch_run(40, {13, 25})
    acts = [(a.remedy, a.step) for a in watch.actions if a.remedy != "clip_gradients"]
    assert acts == [("rollback", 13), ("skip_step", 25)]
    rollback = next(a for a in watch.actions if a.remedy == "rollback")
    assert rollback.detail["lr_after"] == rollback.detail["lr_before"] and watch.monitor.lr.multiplier == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = watch.monitor.state_dict()["remedies"]["skip_step"]
    assert saved["leaked"] is True
    fresh = SkipStep()
    fresh.load_state_dict(saved)
    assert fresh.leaked and (fresh.new_run() or not fresh.leaked)  # a new fit starts deferred again


def test_a_leak_in_the_last_window_is_rolled_back_at_the_end():
    """A NaN at step 25 of 30 (reads every 10): no read comes before the end, which rolls it back."""
    watch, model = _watch_run(30, {25})
    assert ("rollback", 25) in [(a.remedy, a.step) for a in watch.actions]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_leak_read_while_a_checkpoint_is_written_is_rolled_back_at_the_next_read():
    """state_dict() at step 15 reads the NaN step 13 but takes no action there (a checkpoint is being
    written); the next read rolls step 13 back."""
    torch.manual_seed(0)
    model = DigitsMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = next(iter(digits_loaders(batch_size=64)[0]))
    watch = gradwatch.Watch(model, opt, every_n_steps=10, snapshot_every=10, print_summary=False)
    for step in range(30):
        opt.zero_grad()
        xs = torch.full_like(x, math.nan) if step == 13 else x
        torch.nn.functional.cross_entropy(model(xs), y).backward()
        watch.step()
        if step == 15:
            watch.state_dict()
            assert not any(a.remedy == "rollback" for a in watch.actions)
    watch.close()
    rollback = next(a for a in watch.actions if a.remedy == "rollback")
    assert (rollback.step, rollback.detail["restored_step"]) == (13, 10)
    assert all(torch.isfinite(p).all() for p in model.parameters())
