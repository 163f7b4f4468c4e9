"""gradwatch adds no host sync on non-scheduled steps, and reads back once per scheduled step."""

from __future__ import annotations

import pytorch_lightning as pl
from models import DigitsMLP, trainer

import gradwatch
from gradwatch.testing import SyncCounter


class CountedMonitor(gradwatch.HealthMonitor):
    """The real callback, with each per-step hook run under a sync counter."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.syncs: dict[int, int] = {}

    def _counted(self, hook, trainer, *args):
        step = trainer.global_step
        with SyncCounter() as c:
            hook(trainer, *args)
        self.syncs[step] = self.syncs.get(step, 0) + c.count

    def on_train_batch_start(self, trainer, *args):
        self._counted(super().on_train_batch_start, trainer, *args)

    def on_before_optimizer_step(self, trainer, *args):
        self._counted(super().on_before_optimizer_step, trainer, *args)

    def on_train_batch_end(self, trainer, *args):
        self._counted(super().on_train_batch_end, trainer, *args)


def test_no_scalar_syncs_in_any_training_hook(tmp_path, loaders):
    mon = CountedMonitor(every_n_steps=5, per_layer=True)
    trainer(tmp_path, [mon], max_steps=20).fit(DigitsMLP(), loaders[0])
    assert len(mon.syncs) >= 20 and set(mon.syncs.values()) == {0}, mon.syncs


def test_counter_sees_item_and_bool():
    import torch

    with SyncCounter() as c:
        t = torch.ones(4).sum()
        t.item()
        if t > 0:
            float(t)
    assert c.count == 3


def test_reads_happen_only_on_scheduled_steps(tmp_path, loaders):
    reads: list[int] = []

    class Reads(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = mon.monitor.last_stats
            if s is not None and (not reads or reads[-1] != s.step):
                reads.append(s.step)

    mon = gradwatch.HealthMonitor(every_n_steps=4)
    trainer(tmp_path, [mon, Reads()], max_steps=13, logger=False).fit(DigitsMLP(), loaders[0])
    assert reads == [0, 4, 8, 12]
