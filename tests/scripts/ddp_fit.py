"""A 2-process DDP fit on CPU (gloo), run by ``tests/test_distributed.py`` through Lightning's script launcher.

Usage: ``python ddp_fit.py OUT_DIR NAN_STEP [REMEDIES [MEASURE]]`` (REMEDIES: ``off``, the default, or
``auto``; MEASURE: ``every_step``, the default, reading every step, or ``scheduled``, every 2nd step). Rank r trains on samples r, r+2, r+4, ... of the digits (no
shuffling), so the two ranks' batches at step k together are samples [2Bk, 2B(k+1)) -- the batch a single
process would see. At ``NAN_STEP`` rank 1 only gets a NaN batch. Each rank writes what gradwatch judged to
``OUT_DIR/rank<r>.json``; gradwatch itself writes its events file and TensorBoard curves under OUT_DIR.
"""

from __future__ import annotations

import json
import math
import os
import sys

BATCH, STEPS = 32, 6


def build_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def digits():
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y, dtype=torch.long)


def main(out_dir: str, nan_step: int, remedies: str = "off", measure: str = "every_step") -> None:
    import pytorch_lightning as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    import gradwatch

    torch.set_num_threads(1)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = build_model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step == nan_step and self.global_rank == 1:
                x = torch.full_like(x, math.nan)  # only rank 1's batch is broken
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            x, y = digits()
            n = 2 * BATCH * STEPS
            r = self.global_rank
            return DataLoader(TensorDataset(x[:n][r::2], y[:n][r::2]), batch_size=BATCH, shuffle=False)

    if remedies == "exact":  # "auto" with SkipStep(mode="exact"): each step decided as it comes
        from models import exact_auto

        remedies = exact_auto()
    mon = gradwatch.HealthMonitor(
        every_n_steps=1 if measure == "every_step" else 2,
        remedies=remedies,
        measure=measure,
        events_path=os.path.join(out_dir, "events.jsonl"),
    )
    seen: list[dict] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = mon.monitor.last_stats
            seen.append(
                {
                    "steps": [
                        {
                            "step": r.step,
                            "loss": r.loss,
                            "grad_norm": r.grad_norm,
                            "nonfinite": r.grad_nonfinite,
                        }
                        for r in s.steps
                    ],
                    "layers": s.grad_norm,
                    "weights": s.weight_norm,
                }
            )

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        callbacks=[mon, Keep()],
        logger=pl.loggers.TensorBoardLogger(out_dir, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    trainer.fit(Module())
    out = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "findings": [f.to_dict() for f in mon.findings],
        "reads": seen,
        "setup": mon.monitor.setup,
        "actions": [a.to_dict() for a in mon.actions],
        "weights": [p.detach().double().sum().item() for p in trainer.lightning_module.parameters()],
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
