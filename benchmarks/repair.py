"""Repair benchmark: does gradwatch repair faulty runs in place, better than what users would pick instead?

    python benchmarks/repair.py                  # every recoverable zoo fault, 4 configs; healthy runs off vs auto
    python benchmarks/repair.py --only mlp_nan_batch

For each recoverable fault in the zoo (benchmarks/zoo.py) it trains four times:
``off`` (gradwatch observing only), ``auto`` (gradwatch's remedies), ``lightning`` (what a Lightning user
would add: ``gradient_clip_val=1.0`` and ``EarlyStopping(monitor="val_loss", check_finite=True)``) and
``zclip`` (PyPI ``zclip``: adaptive clipping, called from ``on_before_optimizer_step`` as its Lightning
callback does). A run *recovers* when its final weights reach the fault-free twin's validation accuracy
within ``--margin`` (0.03); for the overfitting scenario, when its final validation loss is within 10% of
the best validation loss the unrepaired run ever reached. Every healthy scenario also runs with ``off``
and ``auto``: the final metric must stay within noise.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings

import pytorch_lightning as pl
import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import zoo  # noqa: E402

import gradwatch  # noqa: E402


class ZClipCallback(pl.Callback):
    """ZClip as its own Lightning callback runs it: after backward, before the optimizer step."""

    def __init__(self) -> None:
        from zclip import ZClip

        self.zclip = ZClip()  # its defaults: alpha 0.97, z 2.5, max_grad_norm 1.0, adaptive scaling

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.zclip.step(pl_module)


class BestVal(pl.Callback):
    def __init__(self) -> None:
        self.best = math.inf

    def on_validation_end(self, trainer, pl_module):
        v = trainer.callback_metrics.get("val_loss")
        if v is not None and math.isfinite(float(v)) and not trainer.sanity_checking:
            self.best = min(self.best, float(v))


def configure(name: str, root: str):
    """(monitor, callbacks, trainer kwargs) for a config."""
    if name == "off":
        return (
            gradwatch.HealthMonitor(remedies="off", print_summary=False, events_path=f"{root}/off.jsonl"),
            [],
            {},
        )
    if name == "auto":
        return (
            gradwatch.HealthMonitor(remedies="auto", print_summary=False, events_path=f"{root}/auto.jsonl"),
            [],
            {},
        )
    if name == "lightning":
        stop = pl.callbacks.EarlyStopping(monitor="val_loss", check_finite=True, patience=3)
        return False, [stop], {"gradient_clip_val": 1.0}
    if name == "zclip":
        return False, [ZClipCallback()], {}
    raise ValueError(name)


def run(s: zoo.Scenario, config: str, root: str, seed: int = 0):
    monitor, callbacks, kw = configure(config, root)
    best = BestVal()
    r = zoo.run(s, seed=seed, monitor=monitor, callbacks=[*callbacks, best], trainer_kwargs=kw, root=root)
    return r, best.best


def recovered(s: zoo.Scenario, r: zoo.Result, reference: float, margin: float) -> bool:
    if "overfitting" in s.expected:
        return math.isfinite(r.val_loss) and r.val_loss <= 1.1 * reference
    return math.isfinite(r.val_acc) and r.val_acc >= reference - margin


CONFIGS = ("off", "auto", "lightning", "zclip")


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gradwatch repair benchmark")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--margin", type=float, default=0.03, help="accuracy margin to the fault-free twin")
    parser.add_argument("--root", default="/tmp/gradwatch-repair")
    parser.add_argument("--actions", action="store_true", help="print gradwatch's actions in auto runs")
    parser.add_argument(
        "--healthy-seeds", type=int, default=1, help="seeds 0..N-1 per healthy scenario (mean ± sd, N > 1)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import zclip  # noqa: F401 - imported first: it imports lightning, which sets up its own loggers

    for name in (
        "pytorch_lightning",
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning_fabric",
        "gradwatch",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    faulty = [s for s in zoo.SCENARIOS if s.recoverable and (not args.only or s.name in args.only)]
    healthy = [s for s in zoo.SCENARIOS if s.healthy and (not args.only or s.name in args.only)]
    print(
        f"{'scenario':<28} {'metric':<8} {'twin':>7} "
        + " ".join(f"{c:>10}" for c in CONFIGS)
        + "  gradwatch actions"
    )
    wins = dict.fromkeys(CONFIGS, 0)
    for s in faulty:
        results = {c: run(s, c, args.root) for c in CONFIGS}
        if "overfitting" in s.expected:
            reference, metric = results["off"][1], "val_loss"
        else:
            reference, metric = run(zoo.fault_free(s), "off", args.root)[0].val_acc, "val_acc"
        cells = []
        for c in CONFIGS:
            r = results[c][0]
            ok = recovered(s, r, reference, args.margin)
            wins[c] += ok
            value = r.val_loss if metric == "val_loss" else r.val_acc
            cells.append(f"{value:>8.3f}{' *' if ok else '  '}")
        acts = results["auto"][0].actions
        counts: dict[str, int] = {}
        for a in acts:
            counts[a.remedy] = counts.get(a.remedy, 0) + 1
        print(
            f"{s.name:<28} {metric:<8} {reference:>7.3f} "
            + " ".join(cells)
            + "  "
            + (", ".join(f"{k} x{v}" for k, v in counts.items()) or "-")
        )
        if args.actions:
            for a in acts:
                print(f"      {a}")
    print("\n* = recovered (final weights within the margin of the fault-free twin)")
    seeds = range(args.healthy_seeds)
    print(f"\n{'healthy scenario':<36} {'off':>14} {'auto':>14}  {'diff':>7}  actions in auto")
    harmed = 0
    for s in healthy:
        offs = [run(s, "off", args.root, seed)[0] for seed in seeds]
        autos = [run(s, "auto", args.root, seed)[0] for seed in seeds]
        off, auto = [r.val_acc for r in offs], [r.val_acc for r in autos]
        diff = statistics.mean(auto) - statistics.mean(off)
        harmed += diff < -args.margin
        counts: dict[str, int] = {}
        for r in autos:
            for a in r.actions:
                counts[a.remedy] = counts.get(a.remedy, 0) + 1
        acts = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "-"
        print(f"{s.name:<36} {_spread(off):>14} {_spread(auto):>14}  {diff:>+7.3f}  {acts}")
    n = len(faulty)
    print(
        f"\nhealthy runs harmed by auto (accuracy down by more than {args.margin}): {harmed}/{len(healthy)}"
    )
    print(
        f"recovered {wins['auto']}/{n} faulty runs (auto) vs {wins['lightning']}/{n} (lightning kit) vs "
        f"{wins['zclip']}/{n} (zclip); {wins['off']}/{n} recover with remedies off"
    )
    print(f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
