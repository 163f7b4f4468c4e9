"""Silent bugs (issue 16): no NaN, no crash, a ruined run. Each on a real fit, with the bug and without."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from models import DigitsMLP, digits_loaders, trainer

import gradwatch


def rules_of(monitor) -> set[str]:
    return {f.rule for f in monitor.findings if f.severity != "info"}


class PerBatchScheduler(DigitsMLP):
    """A schedule meant per epoch (cosine over 10 epochs) returned with ``"interval": "step"``: its LR
    reaches 0 after 10 batches, in the first epoch. ``interval="epoch"`` is the healthy twin."""

    def __init__(self, interval: str = "step") -> None:
        super().__init__()
        self.interval = interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def test_a_per_epoch_schedule_stepped_per_batch_is_named_within_two_reads(tmp_path):
    pl.seed_everything(0)
    train, _ = digits_loaders()
    buggy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "buggy.jsonl"))
    trainer(tmp_path, [buggy], logger=False, max_epochs=2).fit(PerBatchScheduler("step"), train)
    (finding,) = [f for f in buggy.findings if f.rule == "lr_collapsed"]
    assert finding.step <= 10 + 2 * 20  # the LR is 0 at step 10; reads every 20 steps
    assert "interval" in finding.advice
    pl.seed_everything(0)
    healthy = gradwatch.HealthMonitor(remedies="off", events_path=str(tmp_path / "healthy.jsonl"))
    trainer(tmp_path, [healthy], logger=False, max_epochs=10).fit(PerBatchScheduler("epoch"), train)
    assert "lr_collapsed" not in rules_of(healthy)  # annealed to 0 at the end, with the loss learned
