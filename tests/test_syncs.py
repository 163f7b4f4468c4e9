"""gradwatch adds no host sync on non-scheduled steps, and reads back once per scheduled step.

Pinned per step, for the default config and the everything-on config: the scalar reads and
device-to-host copies that :class:`~gradwatch.testing.SyncCounter` sees in gradwatch's hooks (and in its
activation hooks, inside the forward), and the calls of ``Transfer.read`` (the one stacked transfer). On
CPU ``.cpu()`` is no copy, so the counter sees nothing there and ``Transfer.read`` is what is counted;
on CUDA (the ``cuda`` cases, run by ``benchmarks/gpu.sh``) the counter sees that one copy too.
"""

from __future__ import annotations

from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from models import DigitsMLP, exact_auto, trainer

import gradwatch
from gradwatch.remedies import SkipStep
from gradwatch.stats import Transfer
from gradwatch.testing import SyncCounter

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu.sh)")


class CountedMonitor(gradwatch.HealthMonitor):
    """The real callback, with each per-step hook run under a counter (:attr:`counter`: host syncs).

    Counts (and the ops counted) are keyed by the optimizer step the batch runs (``global_step`` at the
    batch's start; Lightning has already advanced it when ``on_train_batch_end`` runs).
    """

    counter = SyncCounter

    def __init__(self, **kw):
        super().__init__(**kw)
        self.syncs: dict[int, int] = {}
        self.ops: dict[int, list[str]] = {}
        self.step: int | None = None

    def _counted(self, hook, trainer, *args):
        step = self.step
        with self.counter() as c:
            hook(trainer, *args)
        self.syncs[step] = self.syncs.get(step, 0) + c.count
        self.ops.setdefault(step, []).extend(c.ops)

    def on_train_batch_start(self, trainer, *args):
        self.step = trainer.global_step
        self._counted(super().on_train_batch_start, trainer, *args)

    def on_before_optimizer_step(self, trainer, *args):
        self._counted(super().on_before_optimizer_step, trainer, *args)

    def on_train_batch_end(self, trainer, *args):
        self._counted(super().on_train_batch_end, trainer, *args)
        self.step = None


class CountedMLP(DigitsMLP):
    """The test model, its forward (where gradwatch's activation hooks run) and its backward (where the
    leftover-gradient hooks run on scheduled steps) under a sync counter."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.forward_syncs: Counter[int] = Counter()

    def forward(self, x):
        with SyncCounter() as c:
            out = super().forward(x)
        if self.training:
            self.forward_syncs[self.global_step] += c.count
        return out

    def backward(self, loss, *args, **kwargs):
        with SyncCounter() as c:
            super().backward(loss, *args, **kwargs)
        self.forward_syncs[self.global_step] += c.count


def test_no_scalar_syncs_in_any_training_hook(tmp_path, loaders):
    mon = CountedMonitor(every_n_steps=5, per_layer=True, remedies="off")
    trainer(tmp_path, [mon], max_steps=20).fit(DigitsMLP(), loaders[0])
    assert len(mon.syncs) >= 20 and set(mon.syncs.values()) == {0}, mon.syncs


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_exact_skip_adds_exactly_the_skip_decision(tmp_path, loaders, monkeypatch, device):
    """SkipStep(mode="exact"): skip_step's decision is one read per step (the step's norm vector, summed on the
    host), and adaptive clipping does its arithmetic on that same host number. On CUDA that read is one
    copy to the host; on the CPU the vector is host memory and ``tolist()`` waits for nothing, so the
    counter (which counts scalar reads and device copies) sees nothing there, and the reads themselves
    are counted."""
    from gradwatch.remedies import guard

    reads: Counter[int] = Counter()
    real = guard.host_squared_total

    def counted(values):
        reads[mon.step] += 1
        return real(values)

    monkeypatch.setattr(guard, "host_squared_total", counted)
    accelerator = "gpu" if device == "cuda" else "cpu"
    per_step = 1 if device == "cuda" else 0
    mon = CountedMonitor(every_n_steps=5, per_layer=True, remedies=exact_auto())
    trainer(tmp_path, [mon], max_steps=20, accelerator=accelerator).fit(DigitsMLP(), loaders[0])
    assert len(mon.syncs) >= 20 and set(mon.syncs.values()) == {per_step}, mon.syncs
    assert reads == {s: 1 for s in range(20)}  # one read per step, shared by skip_step and clipping
    assert any(a.remedy == "clip_gradients" for a in mon.actions) or mon.monitor.clip.n == 20
    reads.clear()
    mon = only_skip = CountedMonitor(every_n_steps=5, per_layer=True, remedies=[SkipStep(mode="exact")])
    trainer(tmp_path, [only_skip], max_steps=20, accelerator=accelerator).fit(DigitsMLP(), loaders[0])
    assert set(only_skip.syncs.values()) == {per_step}, only_skip.syncs
    assert reads == {s: 1 for s in range(20)}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_fused_adam_skip_decision_needs_no_read(tmp_path, loaders, device):
    """One fused AdamW and no buffers: skip_step's flag stays on the device (the optimizer's found_inf), so
    skip_step alone reads nothing, and with clipping on too (on the device) nothing but the reads' copies.
    (Rollback is left out: its snapshots copy the state to the host on healthy reads, counted on CUDA.)"""

    class Fused(DigitsMLP):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    accelerator = "gpu" if device == "cuda" else "cpu"
    only_skip = CountedMonitor(every_n_steps=5, remedies=["skip_step"])
    trainer(tmp_path, [only_skip], max_steps=20, accelerator=accelerator).fit(Fused(), loaders[0])
    copies = {s: 1 if device == "cuda" and s % 5 == 0 else 0 for s in range(20)}
    assert only_skip.syncs == copies
    clipping = CountedMonitor(every_n_steps=5, remedies=["skip_step", "clip_gradients"])
    trainer(tmp_path, [clipping], max_steps=20, accelerator=accelerator).fit(Fused(), loaders[0])
    assert clipping.syncs == copies
    assert clipping.monitor.clip.n == 20  # clipping saw every step


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


SYNC_CONFIGS = {
    "auto": dict(),  # the real default: remedies="auto", skip_step deciding at the read
    "default": dict(remedies="off"),
    "everything_on": dict(remedies="off", every_n_steps=5, per_layer=True),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("config", sorted(SYNC_CONFIGS))
def test_sync_budget_per_step(tmp_path, loaders, monkeypatch, config, device):
    """Non-scheduled step: 0 syncs. Scheduled step: 1 ``Transfer.read``, and on CUDA its 1 copy, nothing else."""
    mon = CountedMonitor(**SYNC_CONFIGS[config])
    reads: Counter[int | None] = Counter()
    read = Transfer.read

    def counted_read(self, *args, **kwargs):  # the real read, counted against the step it runs in
        reads[mon.step] += 1
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Transfer, "read", counted_read)
    steps = 25
    model = CountedMLP()
    accelerator = "gpu" if device == "cuda" else "cpu"
    trainer(tmp_path, [mon], max_steps=steps, accelerator=accelerator).fit(model, loaders[0])

    scheduled = [s for s in range(steps) if mon.monitor.schedule(s)]
    assert len(scheduled) == (5 if config == "everything_on" else 2)
    in_steps = {s: n for s, n in reads.items() if s is not None}
    assert in_steps == {s: 1 for s in scheduled}  # one stacked transfer per scheduled step, none elsewhere
    assert reads[None] <= 1  # the end of fit flushes what the last scheduled step left (steps 21-24)
    copy = 1 if device == "cuda" else 0  # .cpu() is a device-to-host copy only off the CPU
    hooks = {s: mon.syncs.get(s, 0) + model.forward_syncs[s] for s in range(steps)}
    if config == "auto":  # the rollback snapshots copy to the host on healthy reads: more copies there
        assert all(hooks[s] == 0 for s in range(steps) if s not in scheduled), hooks
        return
    assert hooks == {s: copy if s in scheduled else 0 for s in range(steps)}, (mon.syncs, model.forward_syncs)
