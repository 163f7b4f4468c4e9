"""Each tool's own time on the training thread, per step: gradwatch and its peers timed alike, in one process.

    python benchmarks/direct.py                                   # the like-for-like pairs, 4 rounds
    python benchmarks/direct.py --configs scheduled_100 wandb_all_100 --rounds 8

``overhead.py`` measures what a monitor adds to the step time. Where that is a few percent, the
machine's noise (±3% for a 30-round median here) hides the difference between two monitors, and a
ratio of two overheads near zero means little. This script measures instead the time spent *inside*
each tool's code: every callback hook of the config's callbacks, the LightningModule hook that logs
Lightning's ``grad_norm``, and every forward hook, forward pre-hook and tensor (gradient) hook a tool
registers with torch (``register_forward_hook`` and friends are wrapped for the whole fit, so that
``wandb.watch``'s parameter and gradient hooks, the activation-stats hooks and gradwatch's own
activation hooks are timed where they run). The fits are those of ``overhead.py`` (same model start,
same batches, same Trainer); runs interleave as there. Only steps ``--warmup`` to ``--warmup +
--steps`` count. A bare fit is timed too: it must come out at zero.

What it leaves out, so that it is a lower bound for every tool alike: Lightning's own dispatch of the
hooks, the logger's handling of what ``self.log`` hands it, and the caches a tool's work evicts from
the training step (``overhead.py``'s step times include all of these).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import overhead  # noqa: E402

#: The callback hooks timed on every callback of a config.
HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)

#: torch's hook registrations: the hook a tool passes is wrapped with the timer.
REGISTRATIONS = (
    (nn.Module, "register_forward_hook"),
    (nn.Module, "register_forward_pre_hook"),
    (nn.Module, "register_full_backward_hook"),
    (torch.Tensor, "register_hook"),
    (torch.Tensor, "register_post_accumulate_grad_hook"),
    (torch.optim.Optimizer, "register_step_pre_hook"),
    (torch.optim.Optimizer, "register_step_post_hook"),
)

#: What runs without --configs: these gradwatch configs and the peers, paired as overhead.SAME_FREQUENCY.
DEFAULT_CONFIGS = [
    "default",
    "observe",
    "every_step",
    "every_100",
    "scheduled",
    "scheduled_100",
    "scheduled_100_norms",
]
DEFAULT_PEERS = ["grad_norm", "wandb_all_1", "wandb_all_100", "act_stats"]


class Clock(pl.Callback):
    """Opens the window at step ``start`` and closes it at ``end``: only time inside it counts."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.on = False
        self.spent = 0.0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.on = self.start <= trainer.global_step < self.end


def _timed(fn: Callable[..., Any], clock: Clock) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if not clock.on:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.spent += time.perf_counter() - t0

    return timed


@contextmanager
def hooks_timed(clock: Clock) -> Iterator[None]:
    """While active, every hook registered with torch is timed into ``clock``."""
    saved = [(owner, name, getattr(owner, name)) for owner, name in REGISTRATIONS]

    def wrapping(register: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(register)
        def wrapped(self: Any, hook: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return register(self, _timed(hook, clock), *args, **kwargs)

        return wrapped

    for owner, name, register in saved:
        setattr(owner, name, wrapping(register))
    try:
        yield
    finally:
        for owner, name, register in saved:
            setattr(owner, name, register)


@contextmanager
def config_timed(wl: overhead.Workload, cfg: overhead.Config, clock: Clock) -> Iterator[overhead.Config]:
    """The config with the hooks its callbacks override timed into ``clock``, and for ``grad_norm`` the
    LightningModule hook that computes and logs it."""

    def callbacks() -> list[pl.Callback]:
        out = cfg.callbacks()
        for cb in out:
            for name in HOOKS:
                if getattr(type(cb), name) is not getattr(pl.Callback, name):
                    setattr(cb, name, _timed(getattr(cb, name), clock))
        return [clock, *out]

    if cfg.grad_norm:
        wl.module.on_before_optimizer_step = _timed(wl.module.on_before_optimizer_step, clock)
    try:
        yield overhead.Config(cfg.name, callbacks, cfg.what, grad_norm=cfg.grad_norm, needs=cfg.needs)
    finally:
        wl.module.__dict__.pop("on_before_optimizer_step", None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="*", default=None, help="default: the gradwatch configs and the peers")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=200, help="steps before the window (default 200)")
    p.add_argument("--steps", type=int, default=800, help="steps in the window (default 800)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("pytorch_lightning", "lightning.pytorch", "gradwatch", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    wanted = args.configs or ["bare", *DEFAULT_CONFIGS, *DEFAULT_PEERS]
    known = {c.name: c for c in overhead.configs()}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {', '.join(known)}")
    chosen = []
    for name in wanted:
        cfg = known[name]
        if cfg.needs and not overhead._have(cfg.needs):
            print(f"skipping {name}: {cfg.needs} is not installed")
            continue
        chosen.append(cfg)
    wl = overhead.make_workload(argparse.Namespace(workload="cpu", cpu=True, batch_size=None, precision=None))
    if "wandb" in {c.needs for c in chosen}:
        import wandb

        wandb.init(
            project="gradwatch-direct", mode="offline", dir=tempfile.mkdtemp(prefix="gradwatch-wandb-")
        )
    root = tempfile.mkdtemp(prefix="gradwatch-direct-")
    spent: dict[str, list[float]] = {c.name: [] for c in chosen}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        order = chosen[rnd % len(chosen) :] + chosen[: rnd % len(chosen)]
        for cfg in order:
            clock = Clock(args.warmup, args.warmup + args.steps)
            with hooks_timed(clock), config_timed(wl, cfg, clock) as timed:
                overhead.run_once(wl, timed, warmup=0, early=0, steps=args.warmup + args.steps, root=root)
            if rnd:
                spent[cfg.name].append(clock.spent / args.steps * 1e6)
        if rnd:
            print(f"round {rnd}: " + "  ".join(f"{n} {v[-1]:.0f}" for n, v in spent.items()), flush=True)
    print(f"\n{wl.describe}; direct us per step, steps {args.warmup}-{args.warmup + args.steps}")
    print(f"{'config':<20}{'median':>9}{'min':>9}{'max':>9}  what")
    med = {}
    for cfg in chosen:
        v = spent[cfg.name]
        med[cfg.name] = statistics.median(v)
        print(f"{cfg.name:<20}{med[cfg.name]:>9.1f}{min(v):>9.1f}{max(v):>9.1f}  {cfg.what}")
    pairs = [q for q in overhead.SAME_FREQUENCY if q[0] in med and q[1] in med]
    if pairs:
        print(
            "\nthe same logging frequency, in direct time: how many times less gradwatch spends than the peer"
        )
    for peer, ours, what in pairs:
        ratio = f"{med[peer] / med[ours]:.1f}x" if med[ours] > 0 else "inf"
        print(f"  {ours} vs {peer} ({what}): {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
