"""Bad configuration fails at construction, saying what to write instead."""

from __future__ import annotations

import pytest

import gradwatch
from gradwatch import ConfigError
from gradwatch.remedies import Remedy


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"remedies": ["skip_stp"]},
            r"unknown remedy 'skip_stp'.*Did you mean 'skip_step'\?.*Known remedy ids: skip_step",
        ),
        (
            {"remedies": "autp"},
            r"remedies='autp' is not a mode\. Did you mean 'auto'\?.*Write remedies=\"auto\"",
        ),
        ({"remedies": 3}, r"remedies must be 'auto', 'off' or a list, got int"),
        ({"remedies": [3.5]}, r"remedies entries must be remedy ids \(str\) or Remedy objects, got 3.5"),
        (
            {"every_n_steps": -5},
            r"every_n_steps must be a positive int, got -5\. Write e\.g\. every_n_steps=20",
        ),
        ({"every_n_steps": 0}, r"every_n_steps must be a positive int, got 0"),
        (
            {"probe_every_n_steps": 0},
            r"probe_every_n_steps must be a positive int, got 0\. Write e\.g\. probe",
        ),
        (
            {"every_n_steps": 2.5},
            r"every_n_steps must be a positive int or a callable step -> bool, got 2\.5 \(float\)",
        ),
        ({"every_n_steps": True}, r"every_n_steps must be a positive int or a callable.*got True \(bool\)"),
        ({"every_n_steps": "10"}, r"got '10' \(str\)\. Write e\.g\. every_n_steps=20"),
        (
            {"alert_url": "hooks.slack.com/x"},
            r"alert_url must be an http\(s\) URL string or None.*Write e\.g\. alert_url=\"https://",
        ),
        ({"alert_url": 42}, r"alert_url must be an http\(s\) URL"),
        ({"events_path": 7}, r"events_path must be a path \(str or os\.PathLike\) or None, got 7 \(int\)"),
        ({"per_layer": "yes"}, r"per_layer must be True or False, got 'yes' \(str\)"),
        ({"activations": 1}, r"activations must be True or False, got 1 \(int\)"),
        ({"detectors": ["nonfinite"]}, r"detectors must be Detector instances, got 'nonfinite' \(str\)"),
        ({"val_loss_key": 1}, r"val_loss_key must be a str or None, got 1"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        gradwatch.HealthMonitor(**kwargs)


def test_config_error_is_a_value_and_type_error():
    with pytest.raises(ValueError, match="every_n_steps"):
        gradwatch.HealthMonitor(every_n_steps=-1)
    with pytest.raises(TypeError, match="every_n_steps"):
        gradwatch.HealthMonitor(every_n_steps="x")


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError, match="positional"):
        gradwatch.HealthMonitor("auto")  # keyword-only, so a typo'd order cannot mean something else


def test_remedy_bounds_are_validated():
    with pytest.raises(ConfigError, match=r"Remedy\(cooldown_steps=\.\.\.\) must be an int >= 0, got -1"):
        Remedy(cooldown_steps=-1)
    with pytest.raises(ConfigError, match=r"budget=\.\.\.\) must be an int >= 0, got 'many'"):
        Remedy(budget="many")


def test_good_configuration_and_caller_list_untouched():
    remedies: list = []
    mon = gradwatch.HealthMonitor(
        remedies=remedies, every_n_steps=lambda s: s % 7 == 0, events_path="x.jsonl"
    )
    assert remedies == [] and mon.monitor.remedies == []
    assert mon.monitor.schedule(14) and not mon.monitor.schedule(15)
    assert gradwatch.HealthMonitor(remedies="off").monitor.remedies == []
    auto = [r.name for r in gradwatch.HealthMonitor().monitor.remedies]
    assert auto == ["skip_step", "clip_gradients", "reduce_lr", "rollback", "reinitialize", "early_stop"]


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: gradwatch.detectors.GradientSpike(alpha=2.0), r"GradientSpike\(alpha=\.\.\.\) must be a number between 0 and 1"),
        (lambda: gradwatch.remedies.ClipGradients(alpha=1.5), r"ClipGradients\(alpha=\.\.\.\) must be a number between 0 and 1"),
        (lambda: gradwatch.remedies.Reinitialize(seed="a"), r"Reinitialize\(seed=\.\.\.\) must be an int, got 'a'"),
        (lambda: gradwatch.HealthMonitor(every_n_steps=lambda: True), r"every_n_steps must take the optimizer step"),
        (lambda: gradwatch.detectors.Divergence(patience=0.5), r"Divergence\(patience=\.\.\.\) must be a whole number > 0, got 0\.5"),
        (lambda: gradwatch.HealthMonitor(detectors=5), r"detectors must be a list of Detector instances, got 5"),
    ],
    ids=["spike_alpha", "clip_alpha", "reinit_seed", "schedule_arity", "float_patience", "detectors_int"],
)
def test_settings_that_used_to_fail_mid_run_fail_at_construction(build, match):
    """Each of these was accepted and then crashed or misbehaved during the fit (ZeroDivisionError, a
    patience of 0 firing every step, a bare TypeError); now the constructor says what to write."""
    with pytest.raises(gradwatch.ConfigError, match=match):
        build()


def test_an_events_path_that_cannot_be_written_fails_at_construction(tmp_path):
    """A directory, or a path under a regular file, is refused when the monitor is built, not when the
    first finding is written mid-run (which used to kill training)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a directory; it names the events file"):
        gradwatch.HealthMonitor(events_path=tmp_path)
    with pytest.raises(ConfigError, match="cannot be created: .* is not a writable folder"):
        gradwatch.HealthMonitor(events_path=blocker / "sub" / "events.jsonl")
    gradwatch.HealthMonitor(events_path=tmp_path / "new" / "deeper" / "events.jsonl")  # made when written
