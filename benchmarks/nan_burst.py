"""A NaN burst mid-run with the default settings: how much progress the rollback loses, in one process and
right after a resume.

    python benchmarks/nan_burst.py [--seeds 3]

The model (``tests/programs.py``'s ``FrozenTable``) has a large state next to its fast steps (a frozen
embedding table of GloVe's size), the case where the 1% time budget alone kept a single snapshot, at
step 0. Each row: where the burst was, the step the rollback restored, the steps lost, and the final
validation accuracy against the same run without the burst. The bound is
``MAX_SNAPSHOT_GAP`` (200) steps or ``MAX_GAP_FRACTION`` (5%) of the run, plus the skip decision's wait
(at most ``every_n_steps``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from models import digits_loaders  # noqa: E402
from programs import FrozenTable  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.remedies.snapshots import MAX_SNAPSHOT_GAP  # noqa: E402


def trainer(tmp: str, monitor, max_steps: int) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=[monitor],
    )


@torch.no_grad()
def accuracy(model: FrozenTable) -> float:
    _, val = digits_loaders()
    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in val)
    return hits / sum(len(y) for _, y in val)


def run(seed: int, burst: tuple[int, ...], steps: int, resume_at: int | None) -> tuple[int | None, float]:
    """Returns (restored step or None, final val accuracy)."""
    pl.seed_everything(seed, verbose=False)
    train, _ = digits_loaders(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = FrozenTable(burst=burst)
        monitor = gradwatch.HealthMonitor(print_summary=False, events_path=os.path.join(tmp, "a.jsonl"))
        if resume_at is None:
            trainer(tmp, monitor, steps).fit(model, train)
        else:
            first = trainer(tmp, monitor, resume_at)
            first.fit(model, train)
            ckpt = os.path.join(tmp, "mid.ckpt")
            first.save_checkpoint(ckpt)
            monitor = gradwatch.HealthMonitor(print_summary=False, events_path=os.path.join(tmp, "b.jsonl"))
            trainer(tmp, monitor, steps).fit(model, train, ckpt_path=ckpt)
        restored = [a.detail["restored_step"] for a in monitor.actions if a.remedy == "rollback"]
        return (restored[0] if restored else None), accuracy(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(1)
    cases = [
        ("mid-run", (400, 401, 402), 600, None),
        ("after resume", (112, 113, 114), 400, 110),
    ]
    print(f"bound: {MAX_SNAPSHOT_GAP} steps (or 5% of the run) + the read's wait (every_n_steps)")
    print("| case | seed | burst at | restored step | steps lost | val acc | without burst |")
    print("|---|---|---|---|---|---|---|")
    for label, burst, steps, resume_at in cases:
        for seed in range(args.seeds):
            restored, acc = run(seed, burst, steps, resume_at)
            _, clean = run(seed, (), steps, resume_at)
            lost = burst[0] - restored if restored is not None else "-"
            print(
                f"| {label} | {seed} | {burst[0]} | {restored} | {lost} | {acc:.3f} | {clean:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
