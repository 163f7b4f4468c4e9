"""Each rule on scripted statistic sequences: it fires, it stays silent, it resets, it checkpoints."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch import ConfigError
from gradwatch.detectors import (
    REGISTRY,
    DeadUnits,
    Divergence,
    ExplodingGradients,
    FrozenWeights,
    GradientSpike,
    LossPlateau,
    LossSpike,
    Overfitting,
    PoorInitialization,
    SaturatedActivations,
    UnnormalizedInputs,
    UpdateRatio,
    VanishingGradients,
    default_detectors,
)
from gradwatch.findings import RULES
from gradwatch.stats import ActivationStats, InputStats, Stats, StepRecord


def rec(step, loss=1.0, grad=1.0, lr=0.1):
    return StepRecord(
        step=step, epoch=0, loss=loss, grad_norm=grad, grad_nonfinite=0, first_nonfinite=None, lr=lr
    )


def feed(detector, losses=None, grads=None, start=0, chunk=10):
    """Feed per-step values in reads of ``chunk`` steps; return every finding."""
    n = len(losses if losses is not None else grads)
    losses = losses or [1.0] * n
    grads = grads or [1.0] * n
    out = []
    for i in range(0, n, chunk):
        steps = [rec(start + j, losses[j], grads[j]) for j in range(i, min(i + chunk, n))]
        out += detector.check(steps[-1].step, Stats(step=steps[-1].step, epoch=0, steps=steps))
    return out


def noisy(n, level=1.0, rel=0.2, seed=0):
    r = random.Random(seed)
    return [level * math.exp(r.gauss(0, rel)) for _ in range(n)]


def act(kind, mean=0.0, std=1.0, max_abs=3.0, zero=0.5, dead=0.0, sat=0.0):
    return ActivationStats(kind, mean, std, max_abs, zero, dead, sat)


def test_every_contract_rule_has_a_detector():
    assert sorted(REGISTRY) == sorted(RULES)
    assert [d.rule for d in default_detectors()] == list(RULES)


# ----------------------------------------------------------------------------- spikes
@pytest.mark.parametrize("cls, field", [(GradientSpike, "grads"), (LossSpike, "losses")])
def test_spike_fires_once_on_an_outlier_and_not_on_noise(cls, field):
    values = noisy(200, rel=0.2)
    assert feed(cls(), **{field: values}) == []
    values[120] *= 40
    values[121] *= 40  # the same episode
    (f,) = feed(cls(), **{field: values})
    assert (f.rule, f.step, f.severity) == (cls.rule, 120, "warning")
    assert f.evidence["ratio"] > 30 and f.evidence["z"] > 5


@pytest.mark.parametrize("cls", [GradientSpike, LossSpike])
def test_spike_silent_during_warmup_and_on_a_trend(cls):
    values = [10.0] + [1.0] * 10 + [math.exp(-0.02 * i) for i in range(300)]  # big first step, smooth decay
    field = "grads" if cls is GradientSpike else "losses"
    assert feed(cls(), **{field: values}) == []


def test_spike_state_round_trip_continues_the_baseline():
    a = GradientSpike()
    feed(a, grads=noisy(100))
    b = GradientSpike()
    b.load_state_dict(a.state_dict())
    assert b.ema.n == a.ema.n and b.ema.mean == a.ema.mean
    (f,) = feed(b, grads=[50.0], start=100)
    assert f.step == 100


# ----------------------------------------------------------------------------- trends
def test_exploding_fires_on_sustained_growth_with_worse_loss_and_resolves():
    grads = noisy(30, 1.0, 0.05) + [1.2**i for i in range(40)] + [1.0] * 60
    losses = [1.0] * 30 + [1.0 + 0.2 * i for i in range(40)] + [1.0] * 60
    out = feed(ExplodingGradients(), losses=losses, grads=grads)
    assert [(f.severity, f.rule) for f in out][:1] == [("warning", "exploding_gradients")]
    assert 30 < out[0].step < 70 and out[0].evidence["growth"] >= 10
    assert out[-1].severity == "info"  # ended


def test_exploding_silent_when_grad_norm_grows_while_loss_falls():
    grads = [0.2 * 1.05**i for i in range(60)] + [3.0] * 100  # a healthy run's norm can grow 15x
    losses = [2.3 * math.exp(-0.03 * i) for i in range(160)]
    assert feed(ExplodingGradients(), losses=losses, grads=grads) == []


def test_divergence_fires_on_a_rising_loss_not_on_one_spike():
    losses = [2.0 * math.exp(-0.05 * i) for i in range(60)]  # converges to ~0.1
    spiky = losses + [losses[-1]] * 30
    spiky[70] = 5.0
    assert feed(Divergence(), losses=spiky) == []
    rising = losses + [losses[-1] * 1.1**i for i in range(40)]
    (f,) = [f for f in feed(Divergence(), losses=rising) if f.severity != "info"][:1]
    assert f.rule == "divergence" and f.step > 60 and f.evidence["ratio"] >= 2


def test_divergence_ignores_tiny_losses_doubling_near_convergence():
    losses = [1.0 * math.exp(-0.1 * i) for i in range(80)] + [0.002] * 20 + [0.004] * 40
    assert feed(Divergence(), losses=losses) == []


def test_divergence_on_a_loss_of_exactly_zero():
    """A loss that reaches exactly 0 (a perfectly fitted hinge loss, say) is not a divergence while it
    stays there, and one that then rises is reported with an infinite ratio, not a ZeroDivisionError."""
    assert feed(Divergence(), losses=[0.0] * 60) == []
    (f,) = [f for f in feed(Divergence(), losses=[0.0] * 30 + [1.0] * 30) if f.severity != "info"][:1]
    assert f.evidence["ratio"] == math.inf


def test_divergence_resumed_with_a_smaller_window():
    """A state saved with window=20 and loaded into window=5 judges the last 5 losses at once."""
    old = Divergence(window=20)
    feed(old, losses=[1.0] * 30)
    new = Divergence(window=5, patience=3)
    new.load_state_dict(old.state_dict())
    out = feed(new, losses=[10.0] * 8, start=30, chunk=1)
    assert len(new.recent) == 5 and [f.rule for f in out] == ["divergence"]


def test_plateau_warns_when_stuck_at_start_and_informs_when_converged():
    stuck = feed(LossPlateau(patience=100), losses=noisy(300, 2.3, 0.01))
    assert stuck and stuck[0].severity == "warning" and stuck[0].evidence["steps"] >= 100
    converged = [2.3 * math.exp(-0.05 * i) for i in range(100)] + noisy(300, 0.02, 0.01)
    out = feed(LossPlateau(patience=100), losses=converged)
    assert out and {f.severity for f in out} == {"info"}


def test_plateau_resets_when_loss_improves_again():
    d = LossPlateau(patience=50)
    losses = [1.0] * 100 + [1.0 * 0.97**i for i in range(50)]
    out = feed(d, losses=losses)
    assert [f.severity for f in out] == ["warning", "info"]
    assert d.since == 0


# ----------------------------------------------------------------------------- scheduled-step rules
def snap(step, **kw):
    return Stats(step=step, epoch=0, steps=[rec(step)], **kw)


def test_vanishing_fires_when_first_layer_starves_and_loss_stalls():
    d = VanishingGradients()
    weights = {f"l{i}": 1.0 for i in range(6)}
    grads = {f"l{i}": 10.0 ** (-i - 2) for i in range(6)}
    grads = dict(reversed(list(grads.items())))  # first layer smallest
    grads = {k: grads[k] for k in weights}
    grads["l0"], grads["l5"] = 1e-7, 1e-2
    out = []
    for s in range(0, 100, 20):
        out += d.check(s, snap(s, weight_norm=weights, grad_norm=grads))
    assert [(f.rule, f.layer, f.step) for f in out] == [("vanishing_gradients", "l0", 20)]
    assert out[0].evidence["ratio"] == pytest.approx(1e-5)
    healthy = dict(grads, l0=1e-3)
    assert d.check(120, snap(120, weight_norm=weights, grad_norm=healthy))[0].severity == "info"


def test_vanishing_ignores_layers_without_gradient():
    d = VanishingGradients()
    weights, grads = {"unused": 1.0, "a": 1.0, "b": 1.0}, {"unused": 0.0, "a": 0.1, "b": 0.2}
    assert all(d.check(s, snap(s, weight_norm=weights, grad_norm=grads)) == [] for s in range(0, 100, 10))


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_saturation_needs_persistence_or_extremity(kind):
    d = SaturatedActivations()
    assert d.check(0, snap(0, activations={"t": act(kind, sat=0.7)})) == []
    (f,) = d.check(20, snap(20, activations={"t": act(kind, sat=0.7)}))
    assert (f.layer, f.evidence["saturated_frac"]) == ("t", 0.7)
    assert d.check(40, snap(40, activations={"t": act(kind, sat=0.8)})) == []  # same episode
    e = SaturatedActivations()
    assert len(e.check(0, snap(0, activations={"t": act(kind, sat=0.95)}))) == 1
    assert e.check(0, snap(0, activations={"relu": act("relu", sat=0.99)})) == []


def test_dead_units_on_relu_modules_and_functional_models():
    d = DeadUnits()
    acts = {"fc1": act("linear", dead=0.9), "relu1": act("relu", dead=0.9), "head": act("linear", dead=0.9)}
    d.check(0, snap(0, activations=acts))
    (f,) = d.check(20, snap(20, activations=acts))
    assert (f.layer, f.severity) == ("relu1", "warning")
    functional = {"fc1": act("linear", dead=0.97), "fc2": act("linear"), "head": act("linear", dead=1.0)}
    e = DeadUnits()
    e.check(0, snap(0, activations=functional))
    (g,) = e.check(20, snap(20, activations=functional))
    assert (g.layer, g.severity) == ("fc1", "critical")  # the head is not followed by a ReLU


def test_dead_units_resolve_when_units_revive():
    d = DeadUnits()
    for s in (0, 20):
        d.check(s, snap(s, activations={"r": act("relu", dead=0.8)}))
    (f,) = d.check(40, snap(40, activations={"r": act("relu", dead=0.1)}))
    assert f.severity == "info" and d.streaks == {}


def test_poor_initialization_from_input_through_depth():
    grow = {f"fc{i}": act("linear", std=0.5 * 8**i) for i in range(5)}
    (f,) = PoorInitialization().check(0, snap(0, activations=grow, inputs=InputStats(0.3, 0.4, 1.0)))
    assert f.severity == "warning" and f.evidence["factor_per_layer"] == pytest.approx(640**0.25)
    deeper = {f"fc{i}": act("linear", std=0.5 * 8**i) for i in range(7)}
    (g,) = PoorInitialization().check(0, snap(0, activations=deeper, inputs=InputStats(0.3, 0.4, 1.0)))
    assert g.severity == "critical" and g.layer == "fc5"
    default = {f"fc{i}": act("linear", std=0.5 * 0.6**i) for i in range(5)}
    assert PoorInitialization().check(0, snap(0, activations=default, inputs=InputStats(0.3, 0.4, 1.0))) == []
    late = PoorInitialization()
    assert (
        late.check(40, snap(40, activations=grow, inputs=InputStats(0.3, 0.4, 1.0))) == []
    )  # weights trained


@pytest.mark.parametrize(
    "x, fires",
    [
        ((4.9, 6.0, 16.0), True),
        ((128, 70, 255), True),
        ((0.0, 1.0, 4.5), False),
        ((0.3, 0.4, 1.0), False),
        ((0.0, 1.0, 12.0), False),
    ],
)
def test_unnormalized_inputs(x, fires):
    out = UnnormalizedInputs().check(0, snap(0, inputs=InputStats(*x)))
    assert bool(out) == fires


def _ratios(total, **layers):
    return {**layers, "total": total}


def test_update_ratio_high_and_low_with_persistence():
    d = UpdateRatio()
    for s in (0, 20):
        assert d.check(s, snap(s, update_ratio=_ratios(0.3, a=0.4, b=0.2))) == []
    (f,) = d.check(40, snap(40, update_ratio=_ratios(0.3, a=0.4, b=0.2)))
    assert (f.layer, f.evidence["layer_ratio"]) == ("a", 0.4)
    low = UpdateRatio()
    out = [low.check(s, snap(s, update_ratio=_ratios(1e-7, a=1e-7))) for s in (0, 20, 40)]
    assert out[2][0].message.startswith("weights change by 1e-07")


def test_update_ratio_low_is_not_judged_during_warmup():
    d = UpdateRatio()
    for s in range(0, 100, 20):
        steps = [rec(s + j, lr=1e-6 * (s + j + 1)) for j in range(20)]
        assert (
            d.check(s + 19, Stats(step=s + 19, epoch=0, steps=steps, update_ratio=_ratios(1e-7, a=1e-7)))
            == []
        )


def test_frozen_weights_names_the_layer_and_why():
    d = FrozenWeights()
    stats = dict(update_ratio=_ratios(1e-3, a=0.0, b=1e-3, c=0.0), grad_norm={"a": 0.0, "b": 0.1, "c": 0.5})
    assert d.check(0, snap(0, **stats)) == []
    out = d.check(20, snap(20, **stats))
    assert [(f.layer, "no gradient" in f.message) for f in out] == [("a", True), ("c", False)]
    assert "never stepped" in out[1].message


def test_overfitting_needs_rising_val_and_falling_train():
    d = Overfitting()
    out = []
    vals = [1.0, 0.8, 0.7, 0.72, 0.8, 0.85, 0.9]
    for i, v in enumerate(vals):
        steps = [rec(i * 10 + j, loss=1.0 * 0.9**i) for j in range(10)]
        out += d.check(i * 10 + 9, Stats(step=i * 10 + 9, epoch=i, steps=steps, val_loss=v))
    (f,) = out
    assert f.epoch == 5 and f.evidence["val_best"] == 0.7 and f.evidence["gap"] > 0


def test_overfitting_after_a_validation_loss_of_exactly_zero():
    d = Overfitting()
    out = []
    for i, v in enumerate([1.0, 0.0, 0.1, 0.2, 0.3, 0.4]):
        steps = [rec(i * 10 + j, loss=0.05 * 0.9**i) for j in range(10)]
        out += d.check(i * 10 + 9, Stats(step=i * 10 + 9, epoch=i, steps=steps, val_loss=v))
    assert [f.evidence["val_best"] for f in out] == [0.0]


def test_overfitting_silent_when_both_rise():
    d = Overfitting()
    for i, v in enumerate([1.0, 0.8, 0.9, 1.0, 1.1]):
        steps = [rec(i * 10 + j, loss=0.5 + 0.2 * i) for j in range(10)]
        assert d.check(i * 10 + 9, Stats(step=i * 10 + 9, epoch=i, steps=steps, val_loss=v)) == []


# ----------------------------------------------------------------------------- config and state
@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: GradientSpike(z=-1),
            r"GradientSpike\(z=\.\.\.\) must be a number > 0, got -1\. Write e\.g\. z=6",
        ),
        (lambda: LossSpike(ratio=0.5), r"LossSpike\(ratio=\.\.\.\) must be a number > 1, got 0\.5"),
        (
            lambda: DeadUnits(threshold="half"),
            r"DeadUnits\(threshold=\.\.\.\) must be a number > 0, got 'half'",
        ),
        (lambda: Divergence(window=1), r"Divergence\(window=\.\.\.\) must be a whole number > 2, got 1"),
    ],
)
def test_bad_thresholds_fail_at_construction(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


@pytest.mark.parametrize("cls", list(REGISTRY.values()))
def test_state_dict_round_trips_through_plain_types(cls):
    import pickle

    d = cls()
    feed(d, losses=noisy(60, 1.0, 0.1), grads=noisy(60, 1.0, 0.1))
    state = d.state_dict()
    e = cls()
    e.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert e.state_dict() == state


def test_divergence_resumed_from_a_state_without_its_noise_still_fires():
    """A checkpoint from before the noise was kept loads it as NaN: every comparison with NaN is false, so
    the rule stayed silent however far the loss rose. It measures the noise again instead."""
    old = Divergence()
    feed(old, losses=noisy(60, 0.5, 0.01))
    state = old.state_dict()
    del state["noise"]
    new = Divergence()
    new.load_state_dict(state)
    out = feed(new, losses=[3.0] * 40, start=60)
    assert [f.rule for f in out if f.severity != "info"][:1] == ["divergence"]


# ----------------------------------------------------------------------------- the model's setup
def setup_stats(step, n=20, stats=None, **setup):
    """A read of ``n`` steps carrying the model's setup (``stats``: more fields of the read)."""
    from gradwatch.stats import ModelSetup

    steps = [rec(step - n + 1 + j) for j in range(n)]
    return Stats(step=step, epoch=0, steps=steps, model_setup=ModelSetup(**setup), **(stats or {}))


def test_frozen_weights_leaves_frozen_and_unoptimized_layers_alone():
    d = FrozenWeights()
    ratios = _ratios(1e-3, a=0.0, b=0.0, c=0.0, d=0.0)
    setup = dict(
        frozen_layers=["a"],  # requires_grad=False: frozen on purpose
        unoptimized={"b.weight": ("b", 10, False, True)},  # gets gradients, no optimizer: the other rule's
        unheld_layers={"b": False, "c": True, "d": False},  # c: left out and in eval (frozen by omission)
    )
    for step in (0, 20):
        out = d.check(step, setup_stats(step, stats=dict(update_ratio=ratios), **setup))
    # d: no optimizer holds it and it gets no gradient: a copy not trained by design (an EMA or teacher
    # model, a DQN target network synced by load_state_dict), not a frozen layer
    assert out == []
    held = dict(setup, unheld_layers={"b": False, "c": True})  # d held by an optimizer, no gradient
    for step in (40, 60):
        out = d.check(step, setup_stats(step, stats=dict(update_ratio=ratios), **held))
    (f,) = out
    assert f.layer == "d" and f.message.endswith("it gets no gradient")


def test_eval_mode_training_names_the_region_at_once_and_resolves():
    from gradwatch.detectors import EvalModeTraining

    d = EvalModeTraining()
    regions = {"": ["net.1 (BatchNorm1d)", "net.3 (Dropout)"]}
    (f,) = d.check(0, setup_stats(0, eval_regions=regions))
    assert f.severity == "warning" and f.layer is None and f.evidence["modules"] == 2
    assert d.check(20, setup_stats(20, eval_regions=regions)) == []  # one finding an episode
    (end,) = d.check(40, setup_stats(40))
    assert end.severity == "info" and "trains again" in end.message


def test_eval_mode_training_on_running_statistics_that_stop_moving():
    from gradwatch.detectors import EvalModeTraining

    d = EvalModeTraining()
    moving = [d.check(s, setup_stats(s, running_stats={"bn": (s + 1.0, 1.0 + s)})) for s in (0, 20, 40)]
    assert moving == [[], [], []]
    out = [d.check(s, setup_stats(s, running_stats={"bn": (s + 1.0, 99.0)})) for s in (60, 80, 100)]
    assert [len(o) for o in out] == [0, 0, 1]  # unchanged over 2 reads (since 60): named at 100
    assert out[2][0].layer == "bn" and "momentum=0" in out[2][0].message
    (end,) = d.check(120, setup_stats(120, running_stats={"bn": (121.0, 42.0)}))
    assert end.severity == "info"


def test_unoptimized_parameters_lasts_while_no_optimizer_holds_them():
    from gradwatch.detectors import UnoptimizedParameters

    d = UnoptimizedParameters()
    unheld = {"bn.weight": ("bn", 64, False, True), "bn.bias": ("bn", 64, False, True)}
    (f,) = d.check(0, setup_stats(0, unoptimized=unheld))
    assert f.severity == "warning" and f.layer == "bn" and f.evidence == {"tensors": 2.0, "elements": 128.0}
    no_grads = {n: (*v[:3], False) for n, v in unheld.items()}  # zero_grad(set_to_none) before the read
    assert d.check(20, setup_stats(20, unoptimized=no_grads)) == []  # still not held: the episode goes on
    (end,) = d.check(40, setup_stats(40))  # an optimizer holds them now
    assert end.severity == "info"
    (f,) = d.check(60, setup_stats(60, foreign=(6, 4938)))
    assert "not the model's" in f.message and f.evidence["tensors"] == 6


def test_setup_rules_validate_their_thresholds():
    from gradwatch.detectors import EvalModeTraining

    with pytest.raises(
        ConfigError, match=r"EvalModeTraining\(persist=\.\.\.\) must be a whole number > 0, got 0"
    ):
        EvalModeTraining(persist=0)
