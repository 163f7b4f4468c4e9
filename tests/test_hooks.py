"""Activation hooks exist only on sampled steps and never outlive a fit, a failure or a second fit."""

from __future__ import annotations

import signal

import pytest
import pytorch_lightning as pl
from models import DigitsMLP, trainer

import gradwatch
from gradwatch.probes.activations import kind_of


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


class CountHooks(pl.Callback):
    """Records the number of forward hooks during each training step's forward (after gradwatch attached)."""

    def __init__(self):
        self.during: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.during[trainer.global_step] = _hook_count(pl_module)


def test_hooks_only_on_sampled_steps_and_removed_at_the_end(tmp_path, loaders):
    model = DigitsMLP()
    counter = CountHooks()
    mon = gradwatch.HealthMonitor(every_n_steps=4)
    trainer(tmp_path, [mon, counter], max_steps=9, logger=False).fit(model, *loaders)
    watched = sum(kind_of(m) is not None for m in model.modules())  # what the activation probe watches
    assert watched == 5  # 3 Linear + 2 ReLU
    assert counter.during == {s: (watched if s % 4 == 0 else 0) for s in range(9)}
    assert _hook_count(model) == 0 and not mon.monitor.hooks_attached


def test_repeated_fits_do_not_stack_hooks(tmp_path, loaders):
    model = DigitsMLP()
    mon = gradwatch.HealthMonitor(every_n_steps=1)
    for _ in range(3):
        counter = CountHooks()
        trainer(tmp_path, [mon, counter], max_steps=3, logger=False).fit(model, loaders[0])
        assert set(counter.during.values()) == {5}
        assert _hook_count(model) == 0


def test_hooks_removed_when_training_raises(tmp_path, loaders):
    class Boom(DigitsMLP):
        def forward(self, x):
            if self.global_step == 4:
                self.net[0](x)  # gradwatch's hooks are attached and have fired for this module
                raise RuntimeError("boom inside forward")
            return super().forward(x)

    model = Boom()
    mon = gradwatch.HealthMonitor(every_n_steps=2)
    with pytest.raises(RuntimeError, match="boom inside forward"):
        trainer(tmp_path, [mon], max_steps=10, logger=False).fit(model, loaders[0])
    assert _hook_count(model) == 0 and not mon.monitor.hooks_attached


def test_hooks_removed_on_keyboard_interrupt(tmp_path, loaders):
    class Stop(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and _hook_count(pl_module):
                raise KeyboardInterrupt

    model = DigitsMLP()
    mon = gradwatch.HealthMonitor(every_n_steps=2)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning shuts down gracefully, then exits
            trainer(tmp_path, [mon, Stop()], max_steps=10, logger=False).fit(model, loaders[0])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores ^C from then on
    assert _hook_count(model) == 0
    from gradwatch.sinks import read_events

    assert read_events(mon.events_path)[-1]["status"] == "interrupted"


def test_activations_off_attaches_nothing(tmp_path, loaders):
    model = DigitsMLP()
    counter = CountHooks()
    trainer(
        tmp_path,
        [gradwatch.HealthMonitor(every_n_steps=1, activations=False), counter],
        max_steps=3,
        logger=False,
    ).fit(model, loaders[0])
    assert set(counter.during.values()) == {0}
