"""Never make a run worse (issue 15): losses that are not "lower is better from a positive start", a NaN
burst's bounded rollback (in one run and after a resume), a fresh fit on a reused monitor, the user's own
LR changes and the LR schedule after a rollback. Real fits, real Trainer, the digits."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from models import DigitsMLP, digits_loaders, exact_auto, trainer
from programs import FrozenTable, GaussianNLL, Reinforce
from test_remedies import FireAt

import gradwatch
from gradwatch.detectors import Detector
from gradwatch.findings import Finding
from gradwatch.remedies.snapshots import MAX_SNAPSHOT_GAP
from gradwatch.sinks.events import read_events

LOSS_TREND = ("divergence", "loss_plateau", "loss_spike", "exploding_gradients")


def warnings_of(monitor, rules=LOSS_TREND) -> list:
    return [f for f in monitor.findings if f.severity != "info" and f.rule in rules]


def moved(monitor) -> list:
    """Actions that change the run's trajectory on loss evidence: rollbacks and LR cuts."""
    return [a for a in monitor.actions if a.remedy in ("rollback", "reduce_lr")]


# ------------------------------------------------------------------------ item 1: signed and surrogate losses
def test_gaussian_nll_gets_no_loss_trend_warning_and_no_rollback(tmp_path):
    """Its loss goes below zero: a ratio to the best (`m >= 2 * best`) is true of any value there, so it was
    called divergence ~5 times with remedies off, and rolled back 3 times with "auto"."""
    for remedies in ("off", "auto"):
        pl.seed_everything(0)
        model = GaussianNLL()
        monitor = gradwatch.HealthMonitor(remedies=remedies, events_path=str(tmp_path / f"{remedies}.jsonl"))
        trainer(tmp_path, [monitor], logger=False, max_epochs=20).fit(model)
        assert model.metric() > 1.0  # trained: validation NLL well below zero
        assert warnings_of(monitor) == [], [f.message for f in warnings_of(monitor)]
        assert moved(monitor) == []


def test_policy_gradient_is_never_rolled_back_and_surrogate_runs_no_loss_trend_rule(tmp_path):
    """REINFORCE's loss is a signed, noisy surrogate: it was rolled back 4 times (greedy reward 0.33
    against 0.92 without remedies). Undeclared it may draw a warning, never an action on it; declared
    ``loss="surrogate"`` the loss-trend rules do not run."""
    pl.seed_everything(0)
    model = Reinforce()
    monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / "default.jsonl"))
    trainer(tmp_path, [monitor], logger=False, max_epochs=10).fit(model)
    assert moved(monitor) == [], [a.message for a in moved(monitor)]
    assert model.metric() > 0.8
    pl.seed_everything(0)
    declared = gradwatch.HealthMonitor(loss="surrogate", events_path=str(tmp_path / "surrogate.jsonl"))
    trainer(tmp_path, [declared], logger=False, max_epochs=10).fit(Reinforce())
    assert warnings_of(declared, ("divergence", "loss_plateau", "loss_spike")) == []
    assert moved(declared) == []


# ------------------------------------------------------------------------ item 2: a NaN burst, bounded loss
def rollbacks(monitor) -> list:
    return [a for a in monitor.actions if a.remedy == "rollback"]


def test_nan_burst_mid_run_loses_at_most_the_bounded_progress(tmp_path):
    """NaNs at steps 400-402 with the default settings: the rollback goes back at most
    MAX_SNAPSHOT_GAP (+ the finding's own step) steps, not to step 0."""
    pl.seed_everything(0)
    monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / "events.jsonl"))
    train, _ = digits_loaders()
    trainer(tmp_path, [monitor], logger=False, max_steps=460, max_epochs=-1).fit(
        FrozenTable(burst=(400, 401, 402)), train
    )
    (rollback,) = rollbacks(monitor)
    assert 400 - rollback.detail["restored_step"] <= MAX_SNAPSHOT_GAP
    assert [f for f in monitor.findings if f.rule == "divergence"] == []  # the rewound steps are forgotten
    assert not [a for a in monitor.actions if a.remedy == "early_stop"]


def test_nan_burst_right_after_a_resume_rolls_back_to_the_resumed_state(tmp_path):
    """A resumed run had no snapshot until its first healthy read: a burst before it early-stopped the
    run ("remedies were spent"). The state restored at resume counts."""
    pl.seed_everything(0)
    train, _ = digits_loaders()
    first = gradwatch.HealthMonitor(events_path=str(tmp_path / "first.jsonl"))
    t1 = trainer(tmp_path, [first], logger=False, max_steps=110, max_epochs=-1)
    t1.fit(FrozenTable(), train)
    ckpt = str(tmp_path / "mid.ckpt")
    t1.save_checkpoint(ckpt)
    resumed = gradwatch.HealthMonitor(events_path=str(tmp_path / "resumed.jsonl"))
    model = FrozenTable(burst=(112, 113, 114))  # before the first read (120)
    trainer(tmp_path, [resumed], logger=False, max_steps=160, max_epochs=-1).fit(model, train, ckpt_path=ckpt)
    (rollback,) = rollbacks(resumed)
    assert rollback.detail["restored_step"] >= 110
    assert not [a for a in resumed.actions if a.remedy == "early_stop"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------ item 3: fresh fits, saved state
def test_a_second_fresh_fit_on_the_same_monitor_starts_fresh(tmp_path):
    """k-fold or seed loops reuse one callback: the LR multiplier, findings and spent budgets of the first
    fit carried into the second."""
    monitor = gradwatch.HealthMonitor(
        remedies=[gradwatch.remedies.ReduceLR(budget=1)],
        detectors=[FireAt("exploding_gradients", {10})],
        events_path=str(tmp_path / "events.jsonl"),
    )
    train, _ = digits_loaders()
    seen = {}
    for fold in (0, 1):
        model = DigitsMLP(lr=0.1)
        trainer(tmp_path, [monitor], logger=False, max_steps=30, max_epochs=-1).fit(model, train)
        seen[fold] = (monitor.monitor.lr.multiplier, len(monitor.findings), len(monitor.actions))
    assert seen[0] == (0.5, 1, 1)
    assert seen[1] == (0.5, 1, 1)  # the fold got its own cut: a fresh budget, from a multiplier of 1


def test_early_stop_pending_validation_and_probe_step_survive_a_checkpoint(tmp_path):
    monitor = gradwatch.HealthMonitor(events_path=str(tmp_path / "events.jsonl"))
    train, val = digits_loaders()
    trainer(tmp_path, [monitor], logger=False, max_steps=45, max_epochs=-1, val_check_interval=20).fit(
        DigitsMLP(), train, val
    )
    core = monitor.monitor
    core.early_stop.stopped = True
    core.pending_val_loss = 0.25
    saved = monitor.state_dict()
    again = gradwatch.HealthMonitor()
    again.load_state_dict(saved)
    assert again.monitor.early_stop.stopped is True
    assert again.monitor.pending_val_loss == 0.25
    assert again.monitor.cadence.last_probe == core.cadence.last_probe is not None


# ------------------------------------------------------------------------ items 6, 7: the user's LR, schedules
class HandLR(DigitsMLP):
    """The word-language-model example's habit: divide the LR by 4 by hand (here at step 30)."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 30:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] /= 4


def test_the_users_own_lr_change_and_gradwatchs_multiplier_compose_through_a_rollback(tmp_path):
    monitor = gradwatch.HealthMonitor(
        every_n_steps=5,
        snapshot_every=20,
        remedies=["reduce_lr", "rollback"],
        detectors=[FireAt("exploding_gradients", {40}), FireAt("divergence", {60}, grad_ratio=3.0)],
        events_path=str(tmp_path / "events.jsonl"),
    )
    train, _ = digits_loaders()
    model = HandLR(lr=0.1)
    trainer(tmp_path, [monitor], logger=False, max_steps=70, max_epochs=-1).fit(model, train)
    assert [a.remedy for a in monitor.actions] == ["reduce_lr", "rollback"]
    assert monitor.actions[1].detail["restored_step"] <= 30  # a snapshot from before the user's change
    expected = 0.1 / 4 * 0.5 * 0.1  # the user's /4, reduce_lr's 0.5, rollback's 0.1
    assert math.isclose(model.trainer.optimizers[0].param_groups[0]["lr"], expected)
    (summary,) = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "summary"]
    assert math.isclose(summary["lr"], expected)  # the effective LR, in the summary


def test_after_a_rollback_the_schedule_follows_the_steps_taken_and_finishes(tmp_path):
    class Cosine(DigitsMLP):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=120)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    monitor = gradwatch.HealthMonitor(
        every_n_steps=5,
        snapshot_every=20,
        remedies=[gradwatch.remedies.Rollback(divergence_lr_factor=1.0)],
        detectors=[FireAt("divergence", {80}, grad_ratio=3.0)],
        events_path=str(tmp_path / "events.jsonl"),
    )
    train, _ = digits_loaders()
    model = Cosine()
    trainer(tmp_path, [monitor], logger=False, max_steps=120, max_epochs=-1).fit(model, train)
    assert [a.remedy for a in monitor.actions] == ["rollback"]
    sched = model.trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 120  # not 120 - (80 - 60): the schedule ends where the run does
    assert model.trainer.optimizers[0].param_groups[0]["lr"] < 1e-3


# ------------------------------------------------------------------------ item 10: finite norms past float32
class HugeLoss(DigitsMLP):
    """The loss times 1e21 under Adam (scale-free but for eps): gradients near 1e19-1e21, finite, whose
    float32 squares overflow. It trains like the unscaled run."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * 1e21

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_finite_gradients_beyond_float32_squares_are_not_called_non_finite(tmp_path):
    """They were: every step skipped, then the run stopped. Decided exactly, nothing is skipped; the
    default (deferred) decides exactly while it has no snapshot, and after at most one rollback."""
    train, val = digits_loaders()
    accuracy = {}
    for label, remedies in (("off", "off"), ("exact", exact_auto()), ("default", "auto")):
        pl.seed_everything(0)
        model = HugeLoss()
        monitor = gradwatch.HealthMonitor(remedies=remedies, events_path=str(tmp_path / f"{label}.jsonl"))
        trainer(tmp_path, [monitor], logger=False, max_epochs=3).fit(model, train)
        with torch.no_grad():
            accuracy[label] = sum(int((model(x).argmax(-1) == y).sum()) for x, y in val) / 360
        if label == "exact":
            assert [a.remedy for a in monitor.actions if a.remedy != "clip_gradients"] == []
            assert [f for f in monitor.findings if f.rule == "nonfinite"] == []
            norm = monitor.monitor.last_stats.steps[-1].grad_norm
            assert 1e19 < norm < 1e30  # measured, finite
        if label == "default":
            assert len([a for a in monitor.actions if a.remedy == "rollback"]) <= 1
            assert not [a for a in monitor.actions if a.remedy == "early_stop"]
    assert accuracy["off"] > 0.85  # the run trains without gradwatch, and as well with it
    assert accuracy["exact"] > accuracy["off"] - 0.03 and accuracy["default"] > accuracy["off"] - 0.05, (
        accuracy
    )


def test_gradient_evidence_for_a_divergence_is_recent_and_from_the_run_as_it_is():
    """A spike long before the rise, or one from steps a rollback discarded, is no evidence."""
    from gradwatch.remedies.responder import trend_only

    spike = Finding("gradient_spike", "warning", 100, 0, None, "spike", {}, "")
    rise = Finding(
        "divergence", "warning", 400, 0, None, "rise", {"grad_ratio": 1.1, "best_from_step": 50}, ""
    )
    assert trend_only(rise, [spike, rise])  # 300 steps before: not this rise's
    near = Finding("gradient_spike", "warning", 330, 0, None, "spike", {}, "")
    assert not trend_only(rise, [near, rise])
    assert trend_only(rise, [near, rise], not_before=350)  # a rollback at 350 discarded it


# ------------------------------------------------------------------------ review: resume and snapshot edges
def test_a_validate_from_a_checkpoint_does_not_make_the_next_fit_a_resume(tmp_path):
    """trainer.validate(ckpt_path=...) loads the monitor's state without a fit: the next fit without a
    checkpoint inherited it (findings, spent budgets, the LR multiplier)."""
    train, val = digits_loaders()
    monitor = gradwatch.HealthMonitor(
        remedies=[gradwatch.remedies.ReduceLR(budget=1)],
        detectors=[FireAt("exploding_gradients", {10})],
        events_path=str(tmp_path / "events.jsonl"),
    )
    t = trainer(tmp_path, [monitor], logger=False, max_steps=30, max_epochs=-1)
    model = DigitsMLP()
    t.fit(model, train)
    t.save_checkpoint(tmp_path / "a.ckpt")
    trainer(tmp_path, [monitor], logger=False).validate(model, val, ckpt_path=str(tmp_path / "a.ckpt"))
    trainer(tmp_path, [monitor], logger=False, max_steps=30, max_epochs=-1).fit(DigitsMLP(), train)
    assert (monitor.monitor.lr.multiplier, len(monitor.findings), len(monitor.actions)) == (0.5, 1, 1)


def test_measure_scheduled_keeps_the_resumed_state_before_a_burst(tmp_path):
    """With measure="scheduled" the first batch after a resume is passed over: the resume snapshot was
    taken at the next scheduled step instead, with the NaN weights of the burst in it."""
    train, _ = digits_loaders()
    options = dict(measure="scheduled", remedies=["rollback"], detectors=None)
    first = gradwatch.HealthMonitor(events_path=str(tmp_path / "a.jsonl"), **options)
    t1 = trainer(tmp_path, [first], logger=False, max_steps=110, max_epochs=-1)
    t1.fit(FrozenTable(), train)
    t1.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = gradwatch.HealthMonitor(events_path=str(tmp_path / "b.jsonl"), **options)
    model = FrozenTable(burst=(112, 113, 114))
    trainer(tmp_path, [resumed], logger=False, max_steps=160, max_epochs=-1).fit(
        model, train, ckpt_path=str(tmp_path / "mid.ckpt")
    )
    (rollback,) = rollbacks(resumed)
    assert rollback.detail["restored_step"] == 110
    assert all(torch.isfinite(p).all() for p in model.parameters())


class OpenDivergence(Detector):
    """A real rule plugin whose divergence warning opens at ``at`` and stays open (its rule id is set on
    the instance: a class attribute would register it in place of the real rule)."""

    def __init__(self, at: int) -> None:
        self.rule, self.at = "divergence", at

    def check(self, step, stats):
        rec = stats.steps[-1]
        if rec.step < self.at:
            return []
        finding = Finding(
            "divergence", "warning", rec.step, rec.epoch, None, "rising", {"grad_ratio": 1.0}, ""
        )
        return self.report("diverge", finding)


def test_no_snapshot_while_an_unstable_episode_is_young_and_again_once_it_is_old(tmp_path):
    """A divergence under way left open (no evidence yet for a remedy) must not fill the ring with its
    states; one open for longer than MAX_SNAPSHOT_GAP steps is the run's steady state."""
    train, _ = digits_loaders()
    monitor = gradwatch.HealthMonitor(
        snapshot_every=20, detectors=[OpenDivergence(at=40)], events_path=str(tmp_path / "e.jsonl")
    )
    taken = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ring = monitor.monitor.snapshots.ring
            if ring and (not taken or ring[-1].step != taken[-1]):
                taken.append(ring[-1].step)

    trainer(tmp_path, [monitor, Spy()], logger=False, max_steps=300, max_epochs=-1).fit(DigitsMLP(), train)
    assert [s for s in taken if 40 <= s < 40 + MAX_SNAPSHOT_GAP] == []
    assert taken[:2] == [0, 20] and any(s >= 40 + MAX_SNAPSHOT_GAP for s in taken)
