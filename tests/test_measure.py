"""``measure="scheduled"``: only the every_n_steps steps are measured, with the numbers every_step gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models import DigitsMLP, digits_loaders, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

import gradwatch
from gradwatch.errors import ConfigError

ROW_TAGS = ("gradwatch/grad_norm/total", "gradwatch/loss/train", "gradwatch/lr")


def _rows(log_dir: str) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in ROW_TAGS}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_scheduled_steps_carry_the_numbers_every_step_gives(tmp_path, accumulate):
    runs = {}
    for measure in ("every_step", "scheduled"):
        torch.manual_seed(0)
        mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off", measure=measure)
        t = trainer(
            tmp_path / measure,
            [mon],
            max_steps=20,
            max_epochs=2,
            log_every_n_steps=1,  # every_step: a row for every step, to compare with
            accumulate_grad_batches=accumulate,
        )
        t.fit(DigitsMLP(), *digits_loaders())  # the same batches in both runs
        runs[measure] = (mon, _rows(t.logger.log_dir))
    (every, every_rows), (sched, sched_rows) = runs["every_step"], runs["scheduled"]
    assert sorted(every_rows["gradwatch/grad_norm/total"]) == list(range(20))
    for tag in ROW_TAGS:
        # only the scheduled steps, each with that step's own loss (accumulated micro-batches included,
        # nothing of the steps passed over) and gradient norm
        assert sorted(sched_rows[tag]) == [0, 5, 10, 15], tag
        for step, value in sched_rows[tag].items():
            assert value == pytest.approx(every_rows[tag][step], rel=1e-6), (tag, step)
    assert sched.monitor.steps_seen == 4 and every.monitor.steps_seen == 20
    assert sched.monitor.last_step == every.monitor.last_step == 19  # the summary counts every step
    assert sched.monitor.ranges["grad_norm"]["first"] == every.monitor.ranges["grad_norm"]["first"]


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountedMonitor(gradwatch.HealthMonitor):
    """The real callback; the tensor ops its per-step hooks run, by optimizer step."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.ops: dict[int, list[str]] = {}
        self.step = 0

    def _counted(self, hook, trainer, *args):
        with _OpCounter() as c:
            hook(trainer, *args)
        self.ops.setdefault(self.step, []).extend(c.ops)

    def on_train_batch_start(self, trainer, *args):
        self.step = trainer.global_step
        self._counted(super().on_train_batch_start, trainer, *args)

    def on_before_optimizer_step(self, trainer, *args):
        self._counted(super().on_before_optimizer_step, trainer, *args)

    def on_train_batch_end(self, trainer, *args):
        self._counted(super().on_train_batch_end, trainer, *args)


def test_steps_between_the_scheduled_ones_cost_no_tensor_op(tmp_path, loaders):
    mon = _CountedMonitor(every_n_steps=10, measure="scheduled")
    t = trainer(tmp_path, [mon], max_steps=30, max_epochs=2)
    t.fit(DigitsMLP(), *loaders)
    assert sorted(mon.ops) == list(range(30))
    for step, ops in mon.ops.items():
        if step % 10:
            assert ops == [], (step, ops[:5])  # not even the loss's detach
        else:
            assert ops, step  # measured: the norms, the read


def test_auto_leaves_out_the_per_step_remedies_and_a_list_naming_them_is_refused():
    mon = gradwatch.HealthMonitor(measure="scheduled")
    names = [r.name for r in mon.monitor.remedies]
    assert names == ["reduce_lr", "rollback", "reinitialize", "early_stop"]
    assert mon.monitor.remedy_mode == "auto"
    with pytest.raises(ConfigError, match=r"remedies=\['rollback'\].*measure=\"every_step\""):
        gradwatch.HealthMonitor(measure="scheduled", remedies=["skip_step", "rollback"])
    with pytest.raises(ConfigError, match="Did you mean 'scheduled'"):
        gradwatch.HealthMonitor(measure="schedule")
    assert gradwatch.HealthMonitor(measure="scheduled", remedies="off").monitor.remedies == []


@pytest.mark.parametrize("nan_at", [10, 12])
def test_a_nan_step_is_rolled_back_at_or_after_the_scheduled_step(tmp_path, loaders, nan_at):
    mon = gradwatch.HealthMonitor(every_n_steps=5, measure="scheduled")
    t = trainer(tmp_path, [mon], max_steps=30, max_epochs=2)
    model = DigitsMLP(nan_at_step=nan_at)
    t.fit(model, *loaders)
    # measured at step 10 itself; from step 12 the NaN weights show at the next scheduled step, 15
    seen = 10 if nan_at == 10 else 15
    assert {f.rule for f in mon.findings} == {"nonfinite"}
    assert {f.step for f in mon.findings} == {seen}
    assert [(a.remedy, a.step) for a in mon.actions] == [("rollback", seen)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_plain_loop_watch_measures_the_scheduled_steps(tmp_path, loaders):
    model = DigitsMLP().net
    head = torch.nn.Linear(32, 10)
    net = torch.nn.Sequential(model, head)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with gradwatch.Watch(
        net, opt, log_dir=str(tmp_path), every_n_steps=4, measure="scheduled", log_every_n_steps=1
    ) as watch:
        for i, (x, y) in enumerate(loaders[0]):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            watch.step(loss)
            if i == 9:
                break
    assert watch.monitor.steps_seen == 3  # steps 0, 4, 8 of 10
    assert sorted(_rows(str(tmp_path))["gradwatch/grad_norm/total"]) == [0, 4, 8]
    assert watch.summary["steps"] == 10


def test_two_optimizers_stepped_by_hand_are_passed_over_together(tmp_path):
    """Lightning counts each optimizer.step() of a manual GAN step: the second optimizer of a step passed
    over is passed over too, and a measured step holds both optimizers' gradients, as with every_step."""
    from test_setups import GAN

    rows = {}
    for measure in ("every_step", "scheduled"):
        torch.manual_seed(0)
        mon = gradwatch.HealthMonitor(every_n_steps=4, remedies="off", measure=measure)
        t = trainer(tmp_path / measure, [mon], max_steps=16, log_every_n_steps=1)
        t.fit(GAN(), digits_loaders()[0])
        rows[measure] = _rows(t.logger.log_dir)["gradwatch/grad_norm/total"]
    assert sorted(rows["every_step"]) == list(range(0, 16, 2))  # the batches' steps
    assert sorted(rows["scheduled"]) == [0, 4, 8, 12]
    for step, value in rows["scheduled"].items():
        assert value == pytest.approx(rows["every_step"][step], rel=1e-6)
