"""Healthy fits stay silent: no warning or critical finding."""

from __future__ import annotations

import pytest
from models import DigitsMLP, trainer

import gradwatch


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(dict(), id="relu-sgd-momentum"),
        pytest.param(dict(optimizer="adam", lr=5e-3), id="relu-adam"),
        pytest.param(dict(act="tanh", lr=0.05), id="tanh-sgd"),
        pytest.param(
            dict(functional=True, optimizer="adam", lr=3e-3, hidden=(128, 64, 32)), id="functional-deeper"
        ),
    ],
)
def test_healthy_fit_has_no_warning_or_critical_finding(tmp_path, loaders, model):
    mon = gradwatch.HealthMonitor(every_n_steps=5)
    t = trainer(tmp_path, [mon], max_epochs=3)
    t.fit(DigitsMLP(**model), *loaders)
    assert [f for f in mon.findings if f.severity in ("warning", "critical")] == []
    assert t.callback_metrics["val_acc"] > 0.8  # it really trained
    assert mon.monitor.steps_seen == 3 * 23
