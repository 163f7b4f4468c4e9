"""Where gradwatch's time goes: wall-clock timers around its hooks and parts, inside a real fit.

    python benchmarks/hook_times.py                     # default config, CPU workload of overhead.py
    python benchmarks/hook_times.py --remedies off      # observing only
    python benchmarks/hook_times.py --steps 600 --split 200
    python benchmarks/hook_times.py --remedies off --every 100 --measure scheduled
    python benchmarks/hook_times.py --batch-size 256 --clip-on-device   # what clipping on device costs

One warm-up fit, then one timed fit of ``--steps`` steps of the CPU workload in ``overhead.py``. Each
timed part is a method wrapped with ``time.perf_counter``; the table gives microseconds per training
step, before and after step ``--split`` (where the heavy probes turn sparse). Nested parts are included
in their callers (``measure_raw`` in ``on_before_optimizer_step``). These are direct times on the
training thread: the end-to-end cost in ``overhead.py`` is somewhat higher, because copies and reads
also evict the training step's data from the caches.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from typing import Any

import pytorch_lightning as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import overhead  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import hooks, monitor  # noqa: E402
from gradwatch.probes import activations, gradients  # noqa: E402
from gradwatch.remedies import guard, snapshots  # noqa: E402

#: (owner, method, label): what is timed. Hooks first, then the parts inside them.
PARTS = [
    (hooks.HealthMonitorHooks, "on_train_batch_start", "on_train_batch_start"),
    (hooks.HealthMonitorHooks, "on_before_optimizer_step", "on_before_optimizer_step"),
    (hooks.HealthMonitorHooks, "on_train_batch_end", "on_train_batch_end"),
    (activations, "summarize", "activation summaries (in forward)"),
    (gradients.GradientProbe, "measure_raw", "  norms: _foreach_norm + stack"),
    (guard.StepGuard, "repair", "  skip decision + clipping"),
    (monitor.Monitor, "flush", "  the read (every_n_steps)"),
    (snapshots.Snapshots, "take", "    rollback snapshot"),
]
TOTAL = {
    "on_train_batch_start",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "activation summaries (in forward)",
}


class StepClock(pl.Callback):
    """Knows the current step, so that each timed call is booked before or after the split."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step = trainer.global_step


def instrument(clock: StepClock, split: int) -> dict[str, list[float]]:
    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for owner, name, label in PARTS:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*args: Any, _fn: Any = fn, _label: str = label, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label][clock.step >= split] += time.perf_counter() - t0

        setattr(owner, name, timed)
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--remedies", default="auto", choices=["auto", "off"])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--split", type=int, default=200)
    p.add_argument("--every", type=int, default=20, help="every_n_steps (default 20)")
    p.add_argument("--measure", default="every_step", choices=["every_step", "scheduled"])
    p.add_argument("--no-probes", action="store_true", help="activations, inputs, update_ratio off")
    p.add_argument("--batch-size", type=int, default=None, help="the CPU workload's batch (default 64)")
    p.add_argument(
        "--clip-on-device",
        action="store_true",
        help="clipping's device arithmetic even where skip_step read the squared norm (what it would cost)",
    )
    args = p.parse_args(argv)
    if args.clip_on_device:
        from gradwatch.remedies.clip_gradients import ClipGradients

        host = ClipGradients.clip

        def on_device(self: Any, grads: Any, sq: Any) -> Any:
            sq = torch.tensor(sq, dtype=torch.float64) if isinstance(sq, float) else sq
            return host(self, grads, sq)

        ClipGradients.clip = on_device
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    wl = overhead.make_workload(argparse.Namespace(workload="cpu", cpu=True, batch_size=args.batch_size, precision=None))
    clock = StepClock()
    spent = instrument(clock, args.split)
    root = tempfile.mkdtemp(prefix="gradwatch-hooks-")

    cfg = overhead.Config(
        "gradwatch",
        lambda: [
            clock,
            gradwatch.HealthMonitor(
                remedies=args.remedies,
                every_n_steps=args.every,
                measure=args.measure,
                print_summary=False,
                **({"activations": False, "inputs": False, "update_ratio": False} if args.no_probes else {}),
            ),
        ],
        "",
    )

    def fit() -> None:  # the benchmark's own run: same model start, batches and Trainer settings
        overhead.run_once(wl, cfg, warmup=0, early=0, steps=args.steps, root=root)

    fit()  # warm-up
    spent.clear()
    fit()
    before, after = args.split, args.steps - args.split
    print(
        f"{wl.describe}; HealthMonitor(remedies={args.remedies!r}, every_n_steps={args.every}, "
        f"measure={args.measure!r}{', no heavy probes' if args.no_probes else ''}); us per training step"
    )
    print(f"{'part':<40}{f'steps 0-{args.split}':>14}{f'steps {args.split}-{args.steps}':>16}")
    totals = [0.0, 0.0]
    for _, _, label in PARTS:
        early, late = spent.get(label, [0.0, 0.0])
        if label in TOTAL:
            totals[0] += early
            totals[1] += late
        print(f"{label:<40}{early / before * 1e6:>14.1f}{late / after * 1e6:>16.1f}")
    print(
        f"{'total (hooks + activation summaries)':<40}{totals[0] / before * 1e6:>14.1f}{totals[1] / after * 1e6:>16.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
