"""Every rule on real fits: the fault zoo's scenarios, each a real Trainer run on bundled data."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import zoo  # noqa: E402

from gradwatch.findings import RULES  # noqa: E402

FAULTY = [s for s in zoo.SCENARIOS if not s.healthy]
HEALTHY = [s for s in zoo.SCENARIOS if s.healthy]

#: For every rule, a zoo scenario in which that very rule must fire (warning or critical).
WITNESS = {
    "nonfinite": "mlp_nan_batch",
    "gradient_spike": "mlp_gradient_spike",
    "loss_spike": "mlp_loss_spike",
    "exploding_gradients": "mlp_lr_jump",
    "divergence": "mlp_lr_jump",
    "vanishing_gradients": "deep_sigmoid_vanishing",
    "saturated_activations": "tanh_normal_init",
    "dead_units": "relu_negative_bias",
    "poor_initialization": "deep_relu_normal_init",
    "unnormalized_inputs": "digits_raw_pixels",
    "update_ratio": "lr_far_too_low",
    "frozen_weights": "detached_first_layer",
    "loss_plateau": "lr_far_too_low",
    "overfitting": "overfit_small_train_set",
    "lr_collapsed": "lr_schedule_per_batch",
    "eval_mode_training": "cnn_bn_eval_mode",
    "unoptimized_parameters": "cnn_bn_no_decay_group",
    "repeated_batch": "mlp_repeated_batch",
    "gradients_not_cleared": "mlp_gradients_not_cleared",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("zoo"))
    return {}, root


def _run(results, name):
    cache, root = results
    if name not in cache:
        cache[name] = zoo.run(next(s for s in zoo.SCENARIOS if s.name == name), root=root)
    return cache[name]


def test_every_rule_has_a_witness():
    assert sorted(WITNESS) == sorted(RULES)


@pytest.mark.parametrize("scenario", FAULTY, ids=lambda s: s.name)
def test_faulty_scenario_is_detected_by_an_expected_rule(results, scenario):
    r = _run(results, scenario.name)
    assert r.detected, [str(f) for f in r.findings]
    # every fault has an onset, scripted or measured in the run, and is found at or after it
    assert r.onset is not None and r.latency is not None and r.latency >= 0
    if scenario.kind == "acute":
        assert r.latency is not None and r.latency <= 5
    if scenario.kind == "early":
        assert r.latency is not None and r.latency < r.steps // scenario.epochs  # within the first epoch
    for f in r.alarms:
        assert f.message and f.advice and f.evidence, f


@pytest.mark.parametrize("rule", sorted(WITNESS))
def test_rule_fires_on_its_witness(results, rule):
    r = _run(results, WITNESS[rule])
    assert rule in r.first_steps(), [str(f) for f in r.findings]


@pytest.mark.parametrize("scenario", HEALTHY, ids=lambda s: s.name)
def test_healthy_scenario_raises_no_warning(results, scenario):
    r = _run(results, scenario.name)
    assert r.alarms == [], [str(f) for f in r.alarms]
    assert r.val_acc > 0.6, r.val_acc  # it trained
