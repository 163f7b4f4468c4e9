"""``reinitialize`` on real fits: it acts on the layer that feeds the dead units (found from the forward
pass, not registration order), never touches frozen parameters, and never re-initializes a loaded model."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from models import DigitsMLP, trainer
from torch import nn

import gradwatch
from gradwatch.detectors import DeadUnits, PoorInitialization
from gradwatch.remedies import Reinitialize


class Digits(pl.LightningModule):
    """Cross-entropy on digits with Adam over the trainable parameters (a fine-tuning setup)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


class SharedReLU(Digits):
    """``fc1 -> act -> fc2 -> act -> fc3 -> act -> head`` with one ``nn.ReLU`` module for the three calls.

    ``act`` is registered after ``fc3``: by registration order it would belong to fc3.
    """

    def __init__(self, dead: int = 40) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 48), nn.Linear(48, 48), nn.Linear(48, 48)
        self.act = nn.ReLU()
        self.head = nn.Linear(48, 10)
        with torch.no_grad():
            self.fc1.bias[:dead] = -10.0  # these fc1 units can never fire

    def forward(self, x):
        for fc in (self.fc1, self.fc2, self.fc3):
            x = self.act(fc(x))
        return self.head(x)


class FrozenBackbone(Digits):
    """A frozen (pretrained) first block with dead units, and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 48), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
        with torch.no_grad():
            self.backbone[0].bias[:40] = -10.0
        self.backbone.requires_grad_(False)

    def forward(self, x):
        return self.head(self.backbone(x))


def fit(tmp_path, model, loader, remedies, detectors, max_steps=30, **kw) -> gradwatch.HealthMonitor:
    mon = gradwatch.HealthMonitor(
        every_n_steps=5, remedies=remedies, detectors=detectors, events_path=str(tmp_path / "events.jsonl")
    )
    trainer(tmp_path, [mon], logger=False, max_steps=max_steps, max_epochs=-1).fit(model, loader, **kw)
    return mon


def test_a_shared_activation_reinitializes_the_layer_that_feeds_its_dead_call(tmp_path, loaders):
    model = SharedReLU()
    mon = fit(tmp_path, model, loaders[0], [Reinitialize()], [DeadUnits()])
    dead = [f for f in mon.findings if f.rule == "dead_units" and f.severity != "info"]
    assert dead and {f.layer for f in dead} == {"act@fc1"}, [(f.layer, f.message) for f in dead]
    assert [(a.remedy, a.detail["layer"], a.detail["consumer"]) for a in mon.actions] == [
        ("reinitialize", "fc1", "fc2")
    ]
    x = loaders[0].dataset.tensors[0]
    with torch.no_grad():
        active = (model.fc1(x) > 0).float().mean(0)
    assert (active < 0.01).float().mean() < 0.5, active  # fc1's units fire again
    assert (active[:40] > 0).sum() >= 30


def test_b_frozen_parameters_are_never_reinitialized(tmp_path, loaders, gw_log):
    model = FrozenBackbone()
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    mon = fit(tmp_path, model, loaders[0], [Reinitialize()], [DeadUnits()])
    dead = [f for f in mon.findings if f.rule == "dead_units" and f.severity != "info"]
    assert [f.layer for f in dead][:1] == ["backbone.1"]  # the fault is seen
    assert not [a for a in mon.actions if a.remedy == "reinitialize"], [a.detail for a in mon.actions]
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    why = [r.getMessage() for r in gw_log.records if "requires_grad=False" in r.getMessage()]
    assert len(why) == 1 and "backbone.0" in why[0], why


def poor(model: nn.Module) -> nn.Module:
    """N(0, 1) weights: the scale grows ~sqrt(fan_in / 2) per ReLU layer."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0)
    return model


@pytest.mark.parametrize("case", ["fresh", "resumed", "frozen", "pretrained"])
def test_c_a_loaded_model_is_not_reinitialized_for_poor_initialization(tmp_path, loaders, case):
    ckpt = None
    model = poor(DigitsMLP(hidden=(128, 128, 128), lr=1e-6))
    if (
        case == "resumed"
    ):  # a run saved without gradwatch, resumed with it: the weights come from the checkpoint
        first = trainer(tmp_path, [], logger=False, max_steps=3)
        first.fit(model, loaders[0])
        ckpt = str(tmp_path / "pretrain.ckpt")
        first.save_checkpoint(ckpt)
        model = DigitsMLP(hidden=(128, 128, 128), lr=1e-6)  # a fresh instance: the checkpoint restores it
    if case == "frozen":
        model.net[0].requires_grad_(False)
    remedy = Reinitialize(pretrained=True) if case == "pretrained" else Reinitialize()
    mon = fit(tmp_path, model, loaders[0], [remedy], [PoorInitialization()], max_steps=12, ckpt_path=ckpt)
    assert [f.rule for f in mon.findings if f.severity != "info"] == ["poor_initialization"]
    acted = [a.detail.get("scheme") for a in mon.actions if a.remedy == "reinitialize"]
    assert acted == (["He"] if case == "fresh" else []), acted
