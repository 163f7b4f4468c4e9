"""The monitor's state round-trips through Lightning checkpoints."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from models import DigitsMLP, trainer

import gradwatch


def test_resume_restores_findings_counters_and_detector_state(tmp_path, loaders):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    trainer(tmp_path, [mon, ckpt], max_epochs=1, enable_checkpointing=True).fit(
        DigitsMLP(inf_grad_at_step=3), *loaders
    )
    assert [f.step for f in mon.findings] == [3, 5]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][mon.state_key]
    assert saved["steps_seen"] == 23 and len(saved["findings"]) == 2

    resumed = gradwatch.HealthMonitor(every_n_steps=5)
    trainer(tmp_path, [resumed], max_epochs=2).fit(
        DigitsMLP(inf_grad_at_step=3), *loaders, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [(f.rule, f.step, f.layer) for f in resumed.findings] == [
        (f.rule, f.step, f.layer) for f in mon.findings
    ]
    assert resumed.monitor.steps_seen == 46
    assert resumed.monitor.ranges["loss"]["first"] == mon.monitor.ranges["loss"]["first"]


def test_two_monitors_in_one_trainer_do_not_collide(tmp_path, loaders):
    a = gradwatch.HealthMonitor(every_n_steps=5, name="fast", events_path=tmp_path / "a.jsonl")
    b = gradwatch.HealthMonitor(every_n_steps=5, name="slow", events_path=tmp_path / "b.jsonl")
    assert a.state_key != b.state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, [a, b, ckpt], max_steps=6, enable_checkpointing=True).fit(
        DigitsMLP(nan_at_step=1), *loaders
    )
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {a.state_key, b.state_key} <= set(states)
    assert len(a.findings) == len(b.findings) >= 1
