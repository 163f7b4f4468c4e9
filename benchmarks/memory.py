"""Host RSS and device memory over a long run with the monitor on: they must stay flat.

    python benchmarks/memory.py                       # 3000 steps each: bare, default, everything_on (~1 min)
    python benchmarks/memory.py --steps 10000 --configs default

A tiny MLP on scikit-learn's digits trains for ``--steps`` optimizer steps per config; every
``--every`` steps the callback prints the process RSS (``/proc/self/status``) and, on a GPU, the
allocated device memory. The slope is a least-squares fit of RSS against the step over the second half
of the run (after allocators and caches have warmed up), in KiB per 1000 steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from models import DigitsMLP, digits_loaders  # noqa: E402  (tests/models.py: the tests' digits MLP)

import gradwatch  # noqa: E402

CONFIGS = {
    "bare": None,
    "default": dict(remedies="off"),
    "everything_on": dict(remedies="off", every_n_steps=5, probe_every_n_steps=None, per_layer=True),
}


def rss_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak, not current, where /proc is missing


class MemoryLog(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[tuple[int, int, int]] = []  # (step, rss KiB, device bytes)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            dev = torch.cuda.memory_allocated() if pl_module.device.type == "cuda" else 0
            self.samples.append((step, rss_kib(), dev))


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of y against x, per 1000 x."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, {'GPU' if cuda else 'CPU'}")
    root = tempfile.mkdtemp(prefix="gradwatch-memory-")
    results = []
    for name in args.configs:
        torch.manual_seed(0)
        train, _ = digits_loaders()
        log = MemoryLog(args.every)
        callbacks: list[pl.Callback] = [log]
        mon = None
        if CONFIGS[name] is not None:
            mon = gradwatch.HealthMonitor(**CONFIGS[name])
            callbacks.append(mon)
        trainer = pl.Trainer(
            max_steps=args.steps,
            max_epochs=-1,
            accelerator="gpu" if cuda else "cpu",
            devices=1,
            logger=pl.loggers.TensorBoardLogger(root, name=name),
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(DigitsMLP(), train)
        print(f"\n{name}: step, RSS MiB" + (", device MiB" if cuda else ""))
        for step, rss, dev in log.samples:
            print(f"  {step:>6} {rss / 1024:8.1f}" + (f" {dev / 2**20:8.1f}" if cuda else ""))
        half = [s for s in log.samples if s[0] >= args.steps // 2]
        rss_slope = slope([(s, r) for s, r, _ in half])
        dev_slope = slope([(s, d / 1024) for s, _, d in half])
        rows = len(mon.monitor.recorder.rows) if mon else 0
        findings = len(mon.findings) if mon else 0
        results.append((name, log.samples[0][1], log.samples[-1][1], rss_slope, dev_slope, rows, findings))

    print(f"\n{'config':<15}{'RSS start':>11}{'RSS end':>10}{'slope 2nd half':>18}", end="")
    print(f"{'device slope':>16}" if cuda else "", end="")
    print(f"{'pending rows':>14}{'findings':>10}")
    for name, first, last, rs, ds, rows, findings in results:
        print(f"{name:<15}{first / 1024:>8.1f}MiB{last / 1024:>7.1f}MiB{rs:>+10.1f}KiB/1k st", end="")
        print(f"{ds:>+9.1f}KiB/1k" if cuda else "", end="")
        print(f"{rows:>14}{findings:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
