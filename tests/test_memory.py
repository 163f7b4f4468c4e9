"""gradwatch's own retained state stays bounded over a long run: pending rows, findings, live tensors.

The benchmark (``benchmarks/memory.py``) shows host RSS flat over thousands of steps; these tests pin
the mechanisms on a few hundred real steps: device rows are dropped at each read, a persistent fault is
one finding (one episode), and the number of live tensors does not grow from one read to the next.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import pytorch_lightning as pl
import torch
from models import DigitsMLP, trainer

import gradwatch


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


class Watch(pl.Callback):
    """Samples the monitor's pending rows every step, findings and live tensors at chosen steps."""

    def __init__(self, mon: gradwatch.HealthMonitor, at: tuple[int, ...]) -> None:
        self.mon, self.at = mon, at
        self.max_rows = 0
        self.tensors: dict[int, int] = {}
        self.findings: dict[int, int] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch just ran
        self.max_rows = max(self.max_rows, len(self.mon.monitor.recorder.rows))
        if step in self.at:
            self.tensors[step] = live_tensors()
            self.findings[step] = len(self.mon.findings)


CONFIGS = {
    "default": dict(remedies="off"),
    "everything_on": dict(remedies="off", every_n_steps=5, per_layer=True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_no_growth_over_many_steps(tmp_path, loaders, config):
    mon = gradwatch.HealthMonitor(**CONFIGS[config])
    watch = Watch(mon, at=(100, 380))  # both right after a scheduled step's read
    trainer(tmp_path, [mon, watch], logger=False, max_epochs=-1, max_steps=400).fit(DigitsMLP(), loaders[0])
    period = 20 if config == "default" else 5
    assert watch.max_rows <= period  # rows wait on device only until the next read
    grown = watch.tensors[380] - watch.tensors[100]
    assert grown <= 0, f"{grown} more live tensors after 280 more steps: {watch.tensors}"


def test_persistent_fault_is_one_finding(tmp_path, loaders):
    """NaN weights from step 30 on: every later step is non-finite, and it stays one finding (one episode)."""
    mon = gradwatch.HealthMonitor(remedies="off")
    watch = Watch(mon, at=(100, 280))
    model = DigitsMLP(nan_at_step=30)
    trainer(tmp_path, [mon, watch], logger=False, max_epochs=-1, max_steps=300).fit(model, loaders[0])
    assert not torch.isfinite(next(model.parameters())).all()  # the fault did persist
    assert watch.findings[100] == watch.findings[280] == len(mon.findings)
    assert 1 <= len(mon.findings) <= 3, [(f.rule, f.step) for f in mon.findings]
