"""A run worth a report: an MLP whose learning rate warms up without end, until training breaks.

    python examples/report_demo.py --out runs/report_demo        # trains (~10 s on a CPU), then:
    gradwatch report runs/report_demo/version_0 --html report.html

The learning rate grows 10% a step from 0.002, and the loss is the hand-written ``log(softmax(x))``
of the demo's faulty run. For a while training improves; then the update/weight ratios leave the
healthy band, ReLU units die, gradients grow, a softmax underflows and the loss turns non-finite:
gradwatch's ``nonfinite`` rule fires with the step and the first layer. The report shows
each stage: the loss with the findings marked, the per-layer gradient-norm heatmap, the activation
heatmaps and the update ratios against the healthy band.
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


class WarmupForever(pl.LightningModule):
    def __init__(self, lr: float = 0.002, growth: float = 1.1) -> None:
        super().__init__()
        self.lr, self.growth = lr, growth
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        # the hand-written log(softmax(x)) of the demo's faulty run: -inf once a softmax underflows to 0
        loss = F.nll_loss(torch.log(torch.softmax(self(x), dim=-1)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.growth**step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "report_demo"))
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y))
    monitor = gradwatch.HealthMonitor(every_n_steps=2, per_layer=True)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(args.out, name=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=2,
    )
    trainer.fit(WarmupForever(), DataLoader(data, batch_size=64, shuffle=True))
    print(f"run folder: {trainer.log_dir}\nreport: gradwatch report {trainer.log_dir} --html report.html")


if __name__ == "__main__":
    main()
