"""The monitor's state round-trips through Lightning checkpoints."""

from __future__ import annotations

import glob

import pytorch_lightning as pl
import torch
from models import DigitsMLP, exact_auto, trainer

import gradwatch
from gradwatch.sinks.events import read_events


def test_resume_restores_findings_counters_and_detector_state(tmp_path, loaders):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies=exact_auto())
    trainer(tmp_path, [mon, ckpt], max_epochs=1, enable_checkpointing=True).fit(
        DigitsMLP(inf_grad_at_step=3), *loaders
    )
    assert [f.step for f in mon.findings] == [3, 5]
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][mon.state_key]
    assert saved["steps_seen"] == 23 and len(saved["findings"]) == 2

    resumed = gradwatch.HealthMonitor(every_n_steps=5, remedies=exact_auto())
    trainer(tmp_path, [resumed], max_epochs=2).fit(
        DigitsMLP(inf_grad_at_step=3), *loaders, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [(f.rule, f.step, f.layer) for f in resumed.findings] == [
        (f.rule, f.step, f.layer) for f in mon.findings
    ]
    assert resumed.monitor.steps_seen == 46
    assert resumed.monitor.ranges["loss"]["first"] == mon.monitor.ranges["loss"]["first"]


def test_two_monitors_in_one_trainer_do_not_collide(tmp_path, loaders):
    # two monitors acting on one model would both act: the keys are this test's subject, so they observe
    a = gradwatch.HealthMonitor(every_n_steps=5, name="fast", events_path=tmp_path / "a.jsonl", remedies="off")
    b = gradwatch.HealthMonitor(every_n_steps=5, name="slow", events_path=tmp_path / "b.jsonl", remedies="off")
    assert a.state_key != b.state_key
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer(tmp_path, [a, b, ckpt], max_steps=6, enable_checkpointing=True).fit(
        DigitsMLP(nan_at_step=1), *loaders
    )
    states = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"]
    assert {a.state_key, b.state_key} <= set(states)
    assert len(a.findings) == len(b.findings) >= 1


class BreakGrads(pl.Callback):
    """Listed before the monitor: an Inf in net.0's gradient at ``steps`` (what gradwatch must see)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step in self.steps:
            pl_module.net[0].weight.grad[0, 0] = float("inf")


class HealGrads(pl.Callback):
    """Listed after the monitor: zero the Inf again so the weights stay finite and the run goes on."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)


BAD_STEPS = (4, 5, 6, 9)  # one episode 4-6 across the checkpoint at step 6, a second one at 9


def test_resume_mid_episode_continues_detectors_counters_and_events(tmp_path, loaders):
    """A run checkpointed at step 6 in the middle of a non-finite episode (steps 4-6), resumed to step 10,
    judges exactly as an uninterrupted run: no second finding for step 6, a new one at 9; its events file
    continues the first run's."""
    # the uninterrupted reference
    ref = gradwatch.HealthMonitor(every_n_steps=4, remedies="off", events_path=tmp_path / "ref.jsonl")
    trainer(tmp_path, [BreakGrads(BAD_STEPS), ref, HealGrads()], max_steps=10, logger=False).fit(
        DigitsMLP(), loaders[0]
    )
    assert [(f.rule, f.step, f.layer) for f in ref.findings] == [
        ("nonfinite", 4, "net.0"),
        ("nonfinite", 9, "net.0"),
    ]

    events = tmp_path / "events.jsonl"
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    first = gradwatch.HealthMonitor(every_n_steps=4, remedies="off", events_path=events)
    trainer(
        tmp_path,
        [BreakGrads(BAD_STEPS), first, HealGrads(), ckpt],
        max_steps=6,
        logger=False,
        enable_checkpointing=True,
    ).fit(DigitsMLP(), loaders[0])
    (path,) = glob.glob(str(tmp_path / "ckpt" / "*step=6*.ckpt"))
    saved = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert saved["detectors"]["NonFinite"]["grads_active"] is True  # mid-episode
    assert saved["steps_seen"] == 6 and saved["last_step"] == 5 and len(saved["findings"]) == 1

    resumed = gradwatch.HealthMonitor(every_n_steps=4, remedies="off", events_path=events)
    trainer(tmp_path, [BreakGrads(BAD_STEPS), resumed, HealGrads()], max_steps=10, logger=False).fit(
        DigitsMLP(), loaders[0], ckpt_path=path
    )
    assert [(f.rule, f.severity, f.step, f.layer) for f in resumed.findings] == [
        (f.rule, f.severity, f.step, f.layer) for f in ref.findings
    ]
    assert resumed.monitor.steps_seen == 10 and resumed.monitor.last_step == 9
    lines = read_events(events)
    # the first run's finding and summary, then the resumed run's new finding and summary
    assert [(e["kind"], e.get("step", e.get("steps"))) for e in lines] == [
        ("finding", 4),
        ("summary", 6),
        ("finding", 9),
        ("summary", 10),
    ]
    assert lines[-1]["rules"][0]["count"] == 2 and lines[-1]["rules"][0]["first_step"] == 4


def every_third(step: int) -> bool:
    return step % 3 == 0


def test_a_callable_schedule_gives_the_same_state_key_in_every_process():
    """The key holds the function's module and name, not its repr (a memory address that differs in the
    resumed process, which then restored nothing, silently)."""
    import subprocess
    import sys

    key = gradwatch.HealthMonitor(every_n_steps=every_third).state_key
    assert "0x" not in key and "every_third" in key
    code = (
        "import sys; sys.path.insert(0, 'tests'); import gradwatch, test_state; "
        "print(gradwatch.HealthMonitor(every_n_steps=test_state.every_third).state_key)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip().splitlines()[-1] == key  # another process, the same key


def test_a_checkpoint_saved_under_another_key_says_it_restores_nothing(tmp_path, loaders, caplog):
    """Resuming with a monitor whose key differs (another name=) restores no gradwatch state: one
    warning says so and what to write, instead of silence."""
    import logging

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = gradwatch.HealthMonitor(every_n_steps=5, name="a", remedies="off")
    trainer(tmp_path, [first, ckpt], max_steps=6, enable_checkpointing=True).fit(DigitsMLP(), *loaders)
    resumed = gradwatch.HealthMonitor(every_n_steps=5, name="b", remedies="off")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        trainer(tmp_path, [resumed], max_steps=8).fit(
            DigitsMLP(), *loaders, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    warned = [r.getMessage() for r in caplog.records if "restores nothing" in r.getMessage()]
    assert len(warned) == 1 and "'name': 'a'" in warned[0] and "name=" in warned[0]
