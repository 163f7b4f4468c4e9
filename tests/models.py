"""Small real models on scikit-learn's bundled digits, with switchable faults, shared by the tests."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits_loaders(
    batch_size: int = 64, scale: float = 1 / 16, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Digits (8x8 images, 10 classes): 1437 train / 360 val, pixels scaled to [0, 1] by default."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) * scale
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    train, val = TensorDataset(x[:1437], y[:1437]), TensorDataset(x[1437:], y[1437:])
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
        DataLoader(val, batch_size=256),
    )


class DigitsMLP(pl.LightningModule):
    """MLP classifier. Faults:

    - ``nan_at_step``: the batch at that optimizer step is NaN (loss and every gradient non-finite).
    - ``inf_grad_at_step``: a gate ``x * sqrt(g - g)`` in front of the second layer has a finite output
      (zero) but an infinite derivative: only the gate's gradient is non-finite; the loss stays finite.
    - ``functional``: activations are ``F.relu`` calls inside forward instead of ``nn.ReLU`` modules.
    """

    def __init__(
        self,
        hidden: tuple[int, ...] = (64, 32),
        lr: float = 0.1,
        optimizer: str = "sgd",
        nan_at_step: int | None = None,
        inf_grad_at_step: int | None = None,
        functional: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = (64, *hidden)
        acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if not functional:
                layers.append(acts[act]())
            if i == 0 and inf_grad_at_step is not None:
                self.gate = nn.Parameter(torch.ones(()))
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(sizes[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
            if self.hparams.functional:
                x = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[self.hparams.act](x)
        if self.training and self.hparams.inf_grad_at_step == self.global_step:
            x = x + x * torch.sqrt(self.gate - self.gate)  # value unchanged; d/dgate = inf
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.hparams.nan_at_step == self.global_step:
            x = torch.full_like(x, math.nan)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def exact_auto() -> list:
    """``remedies="auto"`` with ``SkipStep(mode="exact")``: every non-finite step skipped as it comes."""
    from gradwatch.findings import REMEDIES
    from gradwatch.remedies import SkipStep

    return [SkipStep(mode="exact") if name == "skip_step" else name for name in REMEDIES]


def trainer(tmp_path, callbacks, logger=True, **kw) -> pl.Trainer:
    """A quiet CPU trainer writing under ``tmp_path``."""
    if logger is True:
        logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb")
    defaults = dict(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        logger=logger,
        num_sanity_val_steps=0,
        log_every_n_steps=5,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)
