"""gradwatch in a Lightning Fabric loop: ``fabric.backward(loss); watch.step(loss)``.

    python examples/fabric_loop.py                # one CPU process
    python examples/fabric_loop.py --devices 2    # DDP over two CPU processes (gloo)

The same model and faults as examples/plain_loop.py (a NaN batch at step 15, a gradient spike at step 35).
Under DDP every rank runs the same probes and detectors on all-reduced statistics, so all ranks roll back
the same step and clip the same spike; rank zero writes the events file and TensorBoard.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch


def digits(batch_size: int = 64) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x[perm][:1437], y[perm][:1437]), batch_size=batch_size, shuffle=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--out", default="runs/fabric_loop")
    args = parser.parse_args(argv)

    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    train = fabric.setup_dataloaders(digits())

    with gradwatch.Watch(model, optimizer, log_dir=args.out) as watch:
        step = 0
        for epoch in range(args.epochs):
            for x, y in train:
                if step == 15:
                    x = torch.full_like(x, math.nan)  # a corrupted batch (on every rank)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if step == 35:
                    loss = loss * 50  # a gradient spike
                fabric.backward(loss)
                watch.step(loss, epoch=epoch)  # instead of optimizer.step()
                step += 1

    fabric.print("findings:", [(f.rule, f.step) for f in watch.findings])
    fabric.print("actions:", [(a.remedy, a.step) for a in watch.actions])
    print(
        f"rank {fabric.global_rank}: weights finite {all(bool(p.isfinite().all()) for p in model.parameters())}"
    )
    # rollback snapshots: every rank marks the same steps (decided together); under DDP rank 0 alone holds
    # the copies, and a rollback broadcasts them
    print(f"rank {fabric.global_rank}: snapshots at steps {[s.step for s in watch.monitor.snapshots.ring]}")


if __name__ == "__main__":
    main()
