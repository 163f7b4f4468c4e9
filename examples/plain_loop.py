"""gradwatch in a plain PyTorch loop: ``watch.step(loss)`` instead of ``optimizer.step()``.

    python examples/plain_loop.py                 # writes runs/plain_loop; then: tensorboard --logdir runs/plain_loop

An MLP on scikit-learn's digits, with a NaN batch at step 15 and a 50x loss (a gradient spike) at step
35. gradwatch rolls the NaN step back at the next read (the default decides there, with no host sync per
step; ``SkipStep(mode="exact")`` would skip it as it comes), clips the spike, and prints its summary; the
loop checks
``watch.should_stop`` (early stopping on the validation loss fed with ``watch.validation``).
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradwatch


def digits(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16, torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = DataLoader(TensorDataset(x[:1437], y[:1437]), batch_size=batch_size, shuffle=True)
    return train, DataLoader(TensorDataset(x[1437:], y[1437:]), batch_size=360)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="runs/plain_loop")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    train, val = digits()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10))  # warm-up

    with gradwatch.Watch(model, optimizer, scheduler=scheduler, log_dir=args.out) as watch:
        step = 0
        for epoch in range(args.epochs):
            for x, y in train:
                if step == 15:
                    x = torch.full_like(x, math.nan)  # a corrupted batch
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if step == 35:
                    loss = loss * 50  # an outlier batch: a gradient spike
                loss.backward()
                watch.step(loss, epoch=epoch)  # instead of optimizer.step(); also steps the scheduler
                step += 1
            model.eval()
            with torch.no_grad():
                x, y = next(iter(val))
                logits = model(x)
                val_loss = F.cross_entropy(logits, y)
                acc = (logits.argmax(-1) == y).float().mean().item()
            model.train()
            print(f"epoch {epoch}: val_loss {val_loss.item():.3f} val_acc {acc:.3f}")
            if watch.validation(val_loss):  # True once early stopping acted
                break

    print("findings:", [(f.rule, f.step) for f in watch.findings])
    print("actions:", [(a.remedy, a.step) for a in watch.actions])
    print("events:", watch.events_path)


if __name__ == "__main__":
    main()
