"""``measure="scheduled"``: only the every_n_steps steps are measured, with the numbers every_step gives."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, digits_loaders, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_syncs import CountedMonitor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Subset

import gradwatch
from gradwatch.detectors import Detector, default_detectors
from gradwatch.detectors.overfitting import Overfitting
from gradwatch.errors import ConfigError
from gradwatch.sinks import read_events

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
    """Every tensor op while active, not only host syncs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountedMonitor(CountedMonitor):
    """The real callback; the tensor ops its per-step hooks run, by optimizer step."""

    counter = _OpCounter


@pytest.mark.parametrize("accumulate", [1, 2])
def test_steps_between_the_scheduled_ones_cost_no_tensor_op(tmp_path, loaders, accumulate):
    mon = _CountedMonitor(every_n_steps=10, measure="scheduled")
    t = trainer(tmp_path, [mon], max_steps=30, max_epochs=4, accumulate_grad_batches=accumulate)
    t.fit(DigitsMLP(), *loaders)
    assert sorted(mon.ops) == list(range(30))
    for step, ops in mon.ops.items():
        if step % 10:
            assert ops == [], (step, ops[:5])  # not even the loss's detach, in any micro-batch
        else:
            assert ops, step  # measured: the norms, the read


def test_the_schedule_is_asked_once_per_step(tmp_path, loaders):
    """A callable schedule that changes its answer when asked again (a random one, say): every hook of a
    step sees its first answer, so no probe is left attached and nothing is filed under another step."""
    asked: dict[int, int] = {}

    def schedule(step: int) -> bool:
        asked[step] = asked.get(step, 0) + 1
        return asked[step] == 1 if step == 5 else step % 10 == 0  # at step 5: True, then False

    mon = _CountedMonitor(every_n_steps=schedule, measure="scheduled", remedies="off")
    t = trainer(tmp_path, [mon], max_steps=12, log_every_n_steps=1)
    t.fit(DigitsMLP(), *loaders)
    assert asked[5] == 1
    assert sorted(_rows(t.logger.log_dir)["gradwatch/grad_norm/total"]) == [0, 5, 10]
    assert not mon.monitor.hooks_attached
    assert all(mon.ops[step] == [] for step in (1, 2, 3, 4, 6, 7, 8, 9, 11))


class _FailsAt7(DigitsMLP):
    def on_before_optimizer_step(self, optimizer):  # after the callbacks' hook, before the optimizer steps
        if self.global_step == 7:
            raise RuntimeError("boom")


@pytest.mark.parametrize("measure", ["every_step", "scheduled"])
def test_the_summary_counts_the_steps_that_ran(tmp_path, loaders, measure):
    mon = gradwatch.HealthMonitor(every_n_steps=5, measure=measure, remedies="off", print_summary=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path / "a", [mon], max_steps=20).fit(_FailsAt7(), *loaders)
    summary = [e for e in read_events(mon.events_path) if e["kind"] == "summary"][-1]
    assert (summary["status"], summary["steps"]) == ("failed", 7)  # steps 0-6; step 7 never stepped
    trainer(tmp_path / "b", [mon], max_steps=23).fit(DigitsMLP(), *loaders)
    trainer(tmp_path / "c", [mon], max_steps=5).fit(DigitsMLP(), *loaders)  # the same callback again
    summary = [e for e in read_events(mon.events_path) if e["kind"] == "summary"][-1]
    assert summary["steps"] == 5


class _Judged(Overfitting):
    """The real rule, counting the validations it judges."""

    def __init__(self) -> None:
        super().__init__()
        self.judged: list[int] = []

    def check(self, step, stats):
        if stats.val_loss is not None:
            self.judged.append(step)
        return super().check(step, stats)


class _Validations(pl.Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_validation_end(self, trainer, pl_module):
        self.count += 0 if trainer.sanity_checking else 1


@pytest.mark.parametrize("measure", ["every_step", "scheduled"])
def test_early_stopping_judges_every_validation(tmp_path, measure):
    """Validation after every step (one batch an epoch): each one is judged as it comes, also when no step
    is pending (right after a read, and always with measure="scheduled"), and early stopping acts."""
    torch.manual_seed(0)
    train, val = digits_loaders()
    train = DataLoader(Subset(train.dataset, range(64)), batch_size=64)
    rule, seen = _Judged(), _Validations()
    mon = gradwatch.HealthMonitor(every_n_steps=10, measure=measure, detectors=[rule], print_summary=False)
    t = trainer(tmp_path, [mon, seen], max_epochs=150, logger=False)
    t.fit(DigitsMLP(hidden=(256, 256), optimizer="adam", lr=3e-3), train, val)
    assert len(rule.judged) == seen.count > 10
    assert [a.remedy for a in mon.actions] == ["early_stop"]
    assert t.should_stop and t.current_epoch < 149


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


class _ValSeen(Detector):
    """A user's rule that reads the validation loss (no rule id: it is not registered among the defaults)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def check(self, step, stats):
        if stats.val_loss is not None:
            self.seen.append(stats.val_loss)
        return []


def _digits_batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(digits_loaders()[0]))
    return x, y


@pytest.mark.parametrize(("measure", "seen"), [("every_step", 8), ("scheduled", 7)])
def test_other_rules_still_see_a_validation_early_stopping_judged_at_once(measure, seen):
    """Early stopping judges a validation that comes right after a read at once; every other rule still
    sees it at the next read (with measure="scheduled" the last one is still pending when the loop ends)."""
    torch.manual_seed(0)
    x, y = _digits_batch()
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rule = _ValSeen()
    watch = gradwatch.Watch(
        model, opt, every_n_steps=5, measure=measure, detectors=[*default_detectors(), rule]
    )
    fed = 0
    for step in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.step(loss)
        if step % 5 == 0:  # right after each read
            watch.validation(loss.item())
            fed += 1
    watch.close()
    assert fed == 8 and len(rule.seen) == seen


def test_a_finding_from_a_validation_judged_alone_has_its_tensorboard_row(tmp_path):
    """The read before the validation kept its last step's row back (off the logging cadence); the
    overfitting finding at that step makes it notable, so the row is written, as at a read."""
    torch.manual_seed(0)
    x, y = _digits_batch()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gradwatch.Watch(model, opt, every_n_steps=2, log_dir=str(tmp_path), print_summary=False)
    vals = [3.0, 2.0, 1.0, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]  # best at the third, then rising
    for step in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        watch.step(loss)
        if step % 2 == 0 and step // 2 < len(vals):
            watch.validation(vals[step // 2])  # the loop goes on after a stop request (as min_epochs)
    watch.close()
    found = [f.step for f in watch.findings if f.rule == "overfitting" and f.severity == "warning"]
    assert found
    rows = _rows(str(tmp_path))["gradwatch/grad_norm/total"]
    assert set(found) <= set(rows), (found, sorted(rows))
