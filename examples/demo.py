"""gradwatch demo: a healthy and a faulty training run on scikit-learn's bundled digits.

    python examples/demo.py   # writes runs/demo/{healthy,faulty_off,faulty_auto}; then: tensorboard --logdir runs/demo

The healthy run trains an MLP on pixels scaled to [0, 1]. The faulty run makes three classic
mistakes at once: raw pixels (0..16), a learning rate that is too high, and a hand-written
``log(softmax(x))`` instead of ``cross_entropy``. Its loss becomes infinite within a few steps. It runs
twice: with ``remedies="off"`` gradwatch names the step and the layer, says why, and writes it all to
TensorBoard, the events file and the log, and the run ends with NaN weights; with ``remedies="auto"``
(the default) it rolls back or skips the poisoned steps, lowers the learning rate, re-initializes dead
units, and the run ends with a working model. Each run ends with gradwatch's one-screen health summary,
and the demo prints the final validation accuracy of each.
"""

from __future__ import annotations

import argparse
import logging
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch


def digits(scale: float, batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) * scale
    y = torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = DataLoader(TensorDataset(x[:1437], y[:1437]), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x[1437:], y[1437:]), batch_size=256)


class MLP(pl.LightningModule):
    def __init__(self, lr: float, naive_loss: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.naive_loss = naive_loss
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        if self.naive_loss:  # log of a softmax that underflows to 0: -inf once logits grow
            loss = F.nll_loss(torch.log(torch.softmax(logits, dim=-1)), y)
        else:
            loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def run(
    name: str,
    scale: float,
    lr: float,
    epochs: int,
    out: str,
    naive_loss: bool = False,
    remedies: str = "auto",
) -> tuple[gradwatch.HealthMonitor, float]:
    """Train one run with gradwatch; return the monitor and the final weights' validation accuracy."""
    pl.seed_everything(0, verbose=False)
    train, val = digits(scale)
    monitor = gradwatch.HealthMonitor(every_n_steps=10, per_layer=True, remedies=remedies)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(out, name=name),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    print(f"\n=== {name}: inputs x{scale:g}, lr {lr:g}, {epochs} epochs, remedies={remedies!r} ===")
    model = MLP(lr, naive_loss)
    trainer.fit(model, train, val)
    (metrics,) = trainer.validate(model, val, verbose=False)  # the weights the run ends with
    return monitor, float(metrics["val_acc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "demo"), help="TensorBoard root folder")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    runs = {
        "healthy": run("healthy", 1 / 16, 0.05, args.epochs, args.out),
        "faulty, remedies off": run(
            "faulty_off", 1.0, 0.5, args.epochs, args.out, naive_loss=True, remedies="off"
        ),
        "faulty, remedies auto": run("faulty_auto", 1.0, 0.5, args.epochs, args.out, naive_loss=True),
    }
    print(f"\n{'run':<24} {'val acc':>8} {'findings':>9} {'actions':>8}")
    for name, (monitor, acc) in runs.items():
        print(f"{name:<24} {acc:>8.3f} {len(monitor.findings):>9} {len(monitor.actions):>8}")
    print("\nWhat gradwatch found in the faulty run (remedies off):")
    for f in runs["faulty, remedies off"][0].findings:
        print(f"  {f}")
    print(f"\nTensorBoard: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
