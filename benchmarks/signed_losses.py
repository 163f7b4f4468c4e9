"""Healthy programs with signed or non-progress losses: ``remedies="auto"`` against ``"off"``, 3 seeds.

Usage: ``python benchmarks/signed_losses.py [--seeds 3] [--programs gaussian_nll reinforce gan] [--loss KIND]``

For each program and seed, one fit with ``remedies="off"`` and one with ``"auto"`` (same seed), then the
program's metric (higher is better), the warning/critical findings by rule and the actions by remedy.
``--loss`` passes ``HealthMonitor(loss=...)`` (default: not given, which must be safe too).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import statistics
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from programs import PROGRAMS  # noqa: E402

import gradwatch  # noqa: E402

EPOCHS = {"gaussian_nll": 20, "reinforce": 10, "gan": 30}


def run(program: str, seed: int, remedies: str, loss: str | None) -> tuple[float, list, list]:
    pl.seed_everything(seed, workers=True, verbose=False)
    model = PROGRAMS[program](seed=seed)
    options = {"remedies": remedies, "print_summary": False}
    if loss:
        options["loss"] = loss
    with tempfile.TemporaryDirectory() as tmp:
        monitor = gradwatch.HealthMonitor(events_path=os.path.join(tmp, "events.jsonl"), **options)
        trainer = pl.Trainer(
            max_epochs=EPOCHS[program],
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[monitor],
        )
        trainer.fit(model)
    return model.metric(), monitor.findings, monitor.actions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--programs", nargs="*", default=list(PROGRAMS))
    parser.add_argument("--loss", default=None)
    args = parser.parse_args()
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print(
        "| program | seed | off | auto | auto findings (warning+) | auto actions | off findings (warning+) |"
    )
    print("|---|---|---|---|---|---|---|")
    for program in args.programs:
        metrics: dict[str, list[float]] = {"off": [], "auto": []}
        for seed in range(args.seeds):
            row = {}
            for remedies in ("off", "auto"):
                metric, findings, actions = run(program, seed, remedies, args.loss)
                metrics[remedies].append(metric)
                rules = collections.Counter(f.rule for f in findings if f.severity != "info")
                row[remedies] = (metric, dict(rules), dict(collections.Counter(a.remedy for a in actions)))
            print(
                f"| {program} | {seed} | {row['off'][0]:.3f} | {row['auto'][0]:.3f} | {row['auto'][1] or '-'} "
                f"| {row['auto'][2] or '-'} | {row['off'][1] or '-'} |",
                flush=True,
            )
        for remedies, values in metrics.items():
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"|   {program} mean | {remedies} | {statistics.mean(values):.3f} ± {sd:.3f} | | | | |")


if __name__ == "__main__":
    main()
