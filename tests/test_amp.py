"""Mixed precision: norms are the unscaled ones, GradScaler skips are counted, a collapsing scale is reported.

fp16 on CPU: ``Trainer(precision="16-mixed", accelerator="cpu")`` is silently turned into bf16 by Lightning
2.6, so these tests pass the plugin explicitly, ``MixedPrecision("16-mixed", "cpu")``, which runs real fp16
autocast on CPU with a real ``torch.amp.GradScaler("cpu")`` through Lightning's own AMP code path.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from models import DigitsMLP, trainer
from pytorch_lightning.plugins.precision import MixedPrecision

import gradwatch
from gradwatch.probes.amp import optimizer_handles_unscaling, scaler_of
from gradwatch.probes.layout import layer_of
from gradwatch.sinks.events import read_events


class AmpMLP(DigitsMLP):
    """DigitsMLP with Adam (optionally fused) and a loss multiplied by ``factor`` on ``overflow_steps``:
    the fp16 gradients of those steps overflow, as they do when a loss or a logit gets large."""

    def __init__(self, fused: bool = False, overflow_steps: tuple[int, ...] = (), factor: float = 1e6):
        super().__init__(optimizer="adam", lr=1e-3)
        self.fused, self.overflow_steps, self.factor = fused, set(overflow_steps), factor

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * self.factor if self.global_step in self.overflow_steps else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=self.fused)


class GradReference(pl.Callback):
    """After gradwatch (listed after it): the true per-layer gradient norms, unscaled by hand if needed."""

    def __init__(self):
        self.grad: dict[int, dict[str, float]] = {}
        self.raw_total: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = scaler_of(trainer)
        divide = scaler.get_scale() if scaler is not None and optimizer_handles_unscaling(optimizer) else 1.0
        layers: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                n = torch.linalg.vector_norm(p.grad.double()).item() / divide
                layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + n * n
        self.grad[trainer.global_step] = {k: math.sqrt(v) for k, v in layers.items()}
        self.raw_total[trainer.global_step] = math.sqrt(sum(v for v in layers.values())) * divide


def _fp16():
    return [MixedPrecision("16-mixed", "cpu")]


def test_bf16_mixed_norms_equal_the_gradients(tmp_path, loaders):
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = GradReference()
    trainer(tmp_path, [mon, ref], max_steps=4, logger=False, precision="bf16-mixed").fit(AmpMLP(), loaders[0])
    s = mon.monitor.last_stats
    assert mon.monitor.setup["precision"] == "bf16-mixed" and mon.monitor.setup["scaler"] is None
    for layer, ref_norm in ref.grad[3].items():
        assert s.grad_norm[layer] == pytest.approx(ref_norm, rel=1e-5)
    assert s.steps[0].loss_scale is None and not s.steps[0].scaler_skipped


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "fused-adam-scaled"])
def test_fp16_norms_are_unscaled(tmp_path, loaders, fused):
    """Lightning unscales before on_before_optimizer_step, except for fused Adam: gradwatch divides then."""
    mon = gradwatch.HealthMonitor(every_n_steps=1, remedies="off")
    ref = GradReference()
    trainer(tmp_path, [mon, ref], max_steps=3, logger=False, plugins=_fp16()).fit(
        AmpMLP(fused=fused), loaders[0]
    )
    setup = mon.monitor.setup
    assert setup["precision"] == "16-mixed" and setup["scaler"] == "GradScaler"
    assert setup["fused_unscaling"] == (["Adam"] if fused else [])
    s = mon.monitor.last_stats
    (rec,) = s.steps
    for layer, ref_norm in ref.grad[2].items():
        assert s.grad_norm[layer] == pytest.approx(ref_norm, rel=1e-3)
    total = math.sqrt(sum(v * v for v in ref.grad[2].values()))
    assert rec.grad_norm == pytest.approx(total, rel=1e-3) and rec.grad_norm < 10
    if fused:  # the gradients really were still scaled by 65536 when gradwatch read them
        assert ref.raw_total[2] == pytest.approx(total * 65536.0, rel=1e-3)
    assert rec.loss_scale == 65536.0 and not rec.scaler_skipped


def test_fp16_scaler_skips_are_counted_not_reported_as_faults(tmp_path, loaders):
    events = tmp_path / "events.jsonl"
    mon = gradwatch.HealthMonitor(every_n_steps=4, remedies="off", events_path=events)
    trainer(tmp_path, [mon], max_steps=8, logger=False, plugins=_fp16()).fit(
        AmpMLP(overflow_steps=(2, 3)), loaders[0]
    )
    (nonfinite,) = [d for d in mon.monitor.detectors if d.rule == "nonfinite"]
    assert nonfinite.scaler_skips == 2
    assert [(f.rule, f.severity, f.step) for f in mon.findings] == [("nonfinite", "info", 2)]
    assert mon.findings[0].evidence["loss_scale"] == 32768.0
    lines = read_events(events)
    summary = lines[-1]
    assert summary["verdict"] == "healthy" and summary["setup"]["scaler"] == "GradScaler"
    # the scale ended at 65536 / 2 / 2: both skips really happened in the scaler
    assert nonfinite.skip_streak == 0


def test_fp16_loss_scale_collapse_is_critical(tmp_path, loaders):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    mon = gradwatch.HealthMonitor(every_n_steps=5, remedies="off")
    trainer(tmp_path, [mon], max_steps=10, logger=False, plugins=[plugin]).fit(
        AmpMLP(overflow_steps=tuple(range(1, 10)), factor=1e30), loaders[0]
    )
    got = [(f.severity.value, f.step) for f in mon.findings]
    # step 1: first skip (info); scale 4 -> 2 -> 1 -> 0.5 after the skip of step 3: collapse
    assert got == [("info", 1), ("critical", 3)]
    assert mon.findings[1].evidence["loss_scale"] == 0.5
    assert "loss scale fell to 0.5" in mon.findings[1].message


def test_fp16_hot_path_stays_sync_free(tmp_path, loaders):
    """Scale copies, the skip flag and the fused-optimizer correction are device ops: no scalar read."""
    from test_syncs import CountedMonitor

    mon = CountedMonitor(every_n_steps=5, remedies="off")
    trainer(tmp_path, [mon], max_steps=10, logger=False, plugins=_fp16()).fit(
        AmpMLP(fused=True, overflow_steps=(3,)), loaders[0]
    )
    assert len(mon.syncs) >= 10 and set(mon.syncs.values()) == {0}, mon.syncs
    assert [f.severity.value for f in mon.findings] == ["info"]
