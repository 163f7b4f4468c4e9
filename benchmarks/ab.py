"""This tree's gradwatch against an earlier revision's, in one process: the precise before/after.

    python benchmarks/ab.py --rev b235206                      # default config, 6 rounds
    python benchmarks/ab.py --rev HEAD~3 --remedies off --every 1 --steps 600

On a shared machine the step time swings by ±10% from one run to the next, so two runs of
``overhead.py`` a few minutes apart cannot tell a 2% improvement from noise. Here the revision's
``gradwatch/`` is exported with ``git archive`` and imported under another name (``gradwatch_rev``), and
fits with each version alternate in one process (A B, B A, ...) on the CPU workload of ``overhead.py``.
Two numbers per fit, both after step ``--split`` (the steady state): the direct time spent in each
version's hooks and activation summaries (as ``hook_times.py`` measures it), and the fit's step time.
The table gives their medians over rounds and the paired ratio (this tree / the revision, per round).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import logging
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import overhead  # noqa: E402

import gradwatch  # noqa: E402

#: the hooks and the activation summaries (run inside the forward), as in hook_times.py
TIMED = [
    ("hooks", "HealthMonitorHooks", "on_train_batch_start"),
    ("hooks", "HealthMonitorHooks", "on_before_optimizer_step"),
    ("hooks", "HealthMonitorHooks", "on_train_batch_end"),
    ("probes.activations", None, "summarize"),
]


def export(rev: str, into: str) -> Any:
    """The revision's ``gradwatch`` package, imported as ``gradwatch_rev`` from a copy under ``into``."""
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "gradwatch"], cwd=root.stdout.strip(), capture_output=True
    )
    if archive.returncode:
        raise SystemExit(f"git archive {rev}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    os.rename(os.path.join(into, "gradwatch"), os.path.join(into, "gradwatch_rev"))
    imports = re.compile(r"\b(from|import) gradwatch\b|\"gradwatch\.")
    for folder, _, files in os.walk(os.path.join(into, "gradwatch_rev")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                text = imports.sub(lambda m: m.group(0).replace("gradwatch", "gradwatch_rev"), text)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)
    sys.path.insert(0, into)
    return importlib.import_module("gradwatch_rev")


class Clock(pl.Callback):
    """The current optimizer step, for booking each timed call before or after the split."""

    step = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        Clock.step = trainer.global_step


def instrument(pkg: Any, key: str, split: int, spent: dict[str, float]) -> None:
    for module, owner, name in TIMED:
        target = importlib.import_module(f"{pkg.__name__}.{module}")
        target = getattr(target, owner) if owner else target
        fn = getattr(target, name)

        @functools.wraps(fn)
        def timed(*args: Any, _fn: Any = fn, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                if Clock.step >= split:
                    spent[key] += time.perf_counter() - t0

        setattr(target, name, timed)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", required=True, help="the git revision to compare with (e.g. a commit, HEAD~3)")
    p.add_argument("--remedies", default="auto", choices=["auto", "off"])
    p.add_argument("--every", type=int, default=20, help="every_n_steps of both monitors")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--split", type=int, default=200, help="steps before the timed steady state")
    p.add_argument("--batch-size", type=int, default=None, help="the CPU workload's batch (default 64)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "gradwatch", "gradwatch_rev"):
        logging.getLogger(name).setLevel(logging.ERROR)
    old = export(args.rev, tempfile.mkdtemp(prefix="gradwatch-ab-"))
    versions = {"tree": gradwatch, args.rev: old}
    spent = dict.fromkeys(versions, 0.0)
    for key, pkg in versions.items():
        instrument(pkg, key, args.split, spent)
    wl = overhead.make_workload(argparse.Namespace(workload="cpu", cpu=True, batch_size=args.batch_size, precision=None))
    root = tempfile.mkdtemp(prefix="gradwatch-ab-runs-")
    hooks: dict[str, list[float]] = {k: [] for k in versions}
    steps: dict[str, list[float]] = {k: [] for k in versions}
    timed_steps = args.steps - args.split
    print(overhead.machine())
    print(
        f"{wl.describe}; HealthMonitor(remedies={args.remedies!r}, every_n_steps={args.every}); "
        f"steps {args.split}-{args.steps} of each fit"
    )
    for r in range(args.rounds + 1):  # round 0 warms up
        order = list(versions) if r % 2 else list(versions)[::-1]
        for key in order:
            pkg = versions[key]
            cfg = overhead.Config(
                key,
                lambda pkg=pkg: [
                    Clock(),
                    pkg.HealthMonitor(remedies=args.remedies, every_n_steps=args.every, print_summary=False),
                ],
                "",
            )
            spent[key] = 0.0
            late, _, _, _ = overhead.run_once(wl, cfg, 0, args.split, timed_steps, root)
            if r:
                hooks[key].append(spent[key] / timed_steps * 1e6)
                steps[key].append(late * 1e3)
        if r:
            line = "  ".join(f"{k}: {hooks[k][-1]:.0f} us, {steps[k][-1]:.2f} ms" for k in versions)
            print(f"round {r}: {line}", flush=True)
    print(f"\n{'version':<12}{'hooks us/step':>15}{'step ms':>10}")
    for key in versions:
        print(f"{key:<12}{statistics.median(hooks[key]):>15.0f}{statistics.median(steps[key]):>10.2f}")
    rev = args.rev
    direct = statistics.median(a / b for a, b in zip(hooks["tree"], hooks[rev], strict=True))
    step = statistics.median(a / b for a, b in zip(steps["tree"], steps[rev], strict=True))
    print(f"this tree / {rev}, paired median: hooks {direct:.3f}, step time {step:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
