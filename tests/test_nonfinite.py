"""The ``nonfinite`` rule end to end (real fits) and on scripted statistics."""

from __future__ import annotations

import math

import pytest
from models import DigitsMLP, trainer

import gradwatch
from gradwatch.detectors import NonFinite
from gradwatch.stats import Stats, StepRecord


def _rec(step, loss=1.0, bad=0, first=None):
    return StepRecord(
        step=step,
        epoch=0,
        loss=loss,
        grad_norm=math.nan if bad else 1.0,
        grad_nonfinite=bad,
        first_nonfinite=first,
        lr=0.1,
    )


def test_nan_batch_is_named_at_its_step_and_first_layer(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off")
    trainer(tmp_path, [mon], max_steps=15).fit(DigitsMLP(nan_at_step=7), *loaders)
    grads = [f for f in mon.findings if f.rule == "nonfinite" and "gradient" in f.message]
    assert len(grads) == 1
    f = grads[0]
    assert (f.step, f.epoch, f.layer, f.severity) == (7, 0, "net.0", "critical")
    assert math.isnan(f.evidence["loss"]) and math.isnan(f.evidence["grad_norm"])
    assert f.evidence["nonfinite_params"] == 6.0  # the 3 Linear layers' weights and biases
    assert "NaN" in f.advice
    # the NaN step corrupted the weights; that is reported at the next read (step 10)
    weights = [f for f in mon.findings if f.rule == "nonfinite" and "weights" in f.message]
    assert [(w.step, w.layer) for w in weights] == [(10, "net.0")]


def test_finite_loss_with_one_infinite_gradient_names_that_layer(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=4, remedies="off")
    trainer(tmp_path, [mon], max_steps=12, logger=False).fit(DigitsMLP(inf_grad_at_step=5), loaders[0])
    f = next(f for f in mon.findings if f.rule == "nonfinite")
    assert (f.step, f.layer) == (5, "gate")
    assert math.isfinite(f.evidence["loss"]) and f.evidence["nonfinite_params"] == 1.0
    assert "gate" in f.message


def test_fires_once_per_episode_and_resets():
    d = NonFinite()
    s1 = Stats(
        step=4, epoch=0, steps=[_rec(0), _rec(1, bad=2, first="a.weight"), _rec(2, bad=1, first="a.weight")]
    )
    out = d.check(4, s1)
    assert [(f.step, f.layer) for f in out] == [(1, "a")]
    assert d.check(6, Stats(step=6, epoch=0, steps=[_rec(3, bad=1, first="b.bias")])) == []  # same episode
    assert d.check(7, Stats(step=7, epoch=0, steps=[_rec(4)])) == []  # finite: episode over
    out = d.check(8, Stats(step=8, epoch=0, steps=[_rec(5, loss=math.inf)]))
    assert [(f.step, f.layer, f.message) for f in out] == [(5, None, "training loss is inf")]


def test_silent_on_finite_values():
    d = NonFinite()
    stats = Stats(
        step=9,
        epoch=0,
        steps=[_rec(i, loss=2.0 / (i + 1)) for i in range(10)],
        weight_norm={"a": 3.0, "b": 1.0},
    )
    assert d.check(9, stats) == []


def test_nonfinite_weights_once_until_they_recover():
    d = NonFinite()
    bad = Stats(step=5, epoch=1, steps=[_rec(5)], weight_norm={"a": 1.0, "b": math.nan})
    (f,) = d.check(5, bad)
    assert (f.layer, f.epoch, f.evidence) == ("b", 1, {"nonfinite_layers": 1.0})
    assert d.check(10, bad) == []
    assert d.check(15, Stats(step=15, epoch=1, steps=[_rec(15)], weight_norm={"a": 1.0, "b": 1.0})) == []
    assert len(d.check(20, bad)) == 1


def test_state_round_trip():
    d = NonFinite()
    d.check(1, Stats(step=1, epoch=0, steps=[_rec(1, bad=1, first="x.w")]))
    e = NonFinite()
    e.load_state_dict(d.state_dict())
    assert e.check(2, Stats(step=2, epoch=0, steps=[_rec(2, bad=1, first="x.w")])) == []


@pytest.mark.parametrize("every_n", [1, 3, 25])
def test_step_is_exact_whatever_the_cadence(tmp_path, loaders, every_n):
    mon = gradwatch.HealthMonitor(every_n_steps=every_n, remedies="off")
    trainer(tmp_path, [mon], max_steps=20, logger=False).fit(DigitsMLP(nan_at_step=13), loaders[0])
    assert min(f.step for f in mon.findings) == 13
