"""Step-time overhead of gradwatch, against the bare run and against the tools users would use instead.

    python benchmarks/overhead.py                          # CPU workload: a small CNN on digits (~10 min)
    python benchmarks/overhead.py --workload gpt           # GPT-2-small-like, bf16, batch 8x1024 (GPU)
    python benchmarks/overhead.py --workload gpt --tiny    # the GPT code path, tiny, on CPU (smoke test)
    python benchmarks/overhead.py --configs bare default --rounds 9

Every config trains the same model from the same initial weights on the same batches. Runs interleave
(round 1: every config once, round 2: every config again, in a rotated order, ...) in one process, so a
slow minute on a shared machine hits every config alike; round 0 is a warm-up and is not counted.

How a run is timed: the timer callback (first in the list) notes the time at ``on_train_batch_start`` of
step ``--warmup``, of step ``--warmup + --early`` and at ``on_train_end``, with a device synchronize at
those points only; the run's step time is the last window divided by its ``--steps`` steps, and the
``early`` column is the same ratio over the window before it. On the CPU workload the early window is
steps 20-200, where gradwatch's heavy probes (activations, inputs, update ratio) run at every read, and
the main window steps 200-400, the steady state of a long run, where they run every 100 steps. A per-step timer (``on_train_batch_start`` ->
``on_train_batch_end``) would either miss the hooks that run after it (gradwatch reads back in its own
``on_train_batch_end``) or need a device sync every step, which on a GPU would hide exactly the
asynchrony gradwatch relies on; and a per-step median would ignore the scheduled steps (1 in 20), which
is where gradwatch does most of its work. The window holds a whole number of schedule periods.
A config's step time is the median over rounds; its ratio is that median over bare's median. On the CPU
workload the table adds a ``cpu`` column, the same ratio in the process's CPU time (``time.process_time``,
every thread, the TensorBoard writer's too): on a shared machine the wall clock also counts the time
other tenants take, which moves a 1.03x ratio by several percent from one round to the next.

Peers (skipped with a note when their package is missing):

- ``grad_norm``: Lightning's ``grad_norm`` utility, ``self.log_dict(grad_norm(self, norm_type=2))`` in
  ``on_before_optimizer_step`` every step, as Lightning's docs show.
- ``wandb_all_1`` / ``wandb_all_100``: ``wandb.watch(model, log="all", log_freq=1 | 100)``, offline; a
  ``wandb.log`` commit at the trainer's ``log_every_n_steps`` (50), as a ``WandbLogger`` would make, and
  every step with ``log_freq=1``, so that every step's histograms are sent.
- ``act_stats``: fastai-style activation statistics: forward hooks on every leaf module, mean, std and
  near-zero fraction of each output read with ``.item()`` every step.
- ``hf_debug``: Hugging Face ``transformers.debug_utils.DebugUnderflowOverflow(model)``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradwatch  # noqa: E402

# ------------------------------------------------------------------------------------------ workloads


def digits_cnn() -> nn.Module:
    """A small CNN for 8x8 digits: a few ms per step (batch 64) on one CPU thread."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def digits_loader(batch_size: int = 64, repeat: int = 8) -> DataLoader:
    """scikit-learn's bundled digits as 1x8x8 images in [0, 1], repeated so an epoch holds many steps."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(y, dtype=torch.long)
    ds = TensorDataset(x.repeat(repeat, 1, 1, 1), y.repeat(repeat))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True, generator=torch.Generator())


@dataclass
class GPTConfig:
    vocab: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    block: int = 1024
    n_layer: int = 12
    n_head: int = 12
    d: int = 768


class Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.n_head = c.n_head
        self.ln_1 = nn.LayerNorm(c.d)
        self.qkv = nn.Linear(c.d, 3 * c.d)
        self.proj = nn.Linear(c.d, c.d)
        self.ln_2 = nn.LayerNorm(c.d)
        self.mlp = nn.Sequential(
            nn.Linear(c.d, 4 * c.d), nn.GELU(approximate="tanh"), nn.Linear(4 * c.d, c.d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 small (124M parameters with the defaults): learned positions, pre-LN blocks, tied head."""

    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(c.vocab, c.d)
        self.wpe = nn.Embedding(c.block, c.d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d)
        self.head = nn.Linear(c.d, c.vocab, bias=False)
        self.head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(
                    p, 0.0, 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("proj.weight") else 0.02
                )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def token_loader(c: GPTConfig, batch_size: int, batches: int = 32) -> DataLoader:
    """Random token sequences (a throughput benchmark: the numbers do not depend on the text)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, c.vocab, (batch_size * batches, c.block + 1), generator=g)
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False, drop_last=True)


class BenchModule(pl.LightningModule):
    """One LightningModule for both workloads; ``log_grad_norm`` is the Lightning ``grad_norm`` peer."""

    def __init__(self, model: nn.Module, kind: str, lr: float, fused: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.lr, self.fused = model, kind, lr, fused
        self.log_grad_norm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        if self.kind == "gpt":
            (tokens,) = batch
            logits = self(tokens[:, :-1])
            return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        x, y = batch
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.log_grad_norm:  # the recipe in Lightning's docs ("track_grad_norm" replacement)
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self):
        if self.kind == "gpt":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, fused=self.fused)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@dataclass
class Workload:
    name: str
    module: BenchModule
    loader: DataLoader
    trainer_kw: dict[str, Any]
    describe: str
    initial: dict[str, torch.Tensor] = field(default_factory=dict)


def make_workload(args: argparse.Namespace) -> Workload:
    cuda = torch.cuda.is_available() and not args.cpu
    accel = {"accelerator": "gpu" if cuda else "cpu", "devices": 1}
    if args.workload == "cpu":
        torch.manual_seed(0)
        module = BenchModule(digits_cnn(), "cpu", lr=0.05)
        loader = digits_loader(args.batch_size or 64)
        kw = {**accel, "precision": args.precision or "32-true"}
        desc = f"CNN on digits (1x8x8), {sum(p.numel() for p in module.parameters()):,} params, batch {loader.batch_size}"
    else:
        c = GPTConfig(vocab=512, block=64, n_layer=2, n_head=4, d=64) if args.tiny else GPTConfig()
        torch.manual_seed(0)
        module = BenchModule(GPT(c), "gpt", lr=6e-4, fused=cuda)
        batch = args.batch_size or (4 if args.tiny else 8)
        loader = token_loader(c, batch)
        kw = {**accel, "precision": args.precision or ("bf16-mixed" if cuda else "32-true")}
        n = sum(p.numel() for p in module.parameters())
        desc = f"GPT ({c.n_layer} layers, d={c.d}, {n / 1e6:.1f}M params), batch {batch}x{c.block}"
    desc += f", precision {kw['precision']}"
    if cuda:
        module.cuda()  # the initial weights live on the device; every run restores them
    wl = Workload(args.workload, module, loader, kw, desc)
    wl.initial = copy.deepcopy(module.state_dict())
    return wl


# --------------------------------------------------------------------------------------------- peers


class ActStats(pl.Callback):
    """fastai's ``ActivationStats``: per leaf module, mean / std / near-zero fraction, ``.item()`` each step."""

    def __init__(self) -> None:
        self.stats: dict[str, list[tuple[float, float, float]]] = {}
        self._handles: list[Any] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for name, m in pl_module.named_modules():
            if next(m.children(), None) is None:  # leaf modules
                self._handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable:
        def hook(module, args, out) -> None:
            if not module.training or not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            with torch.no_grad():
                o = out.float()
                mean = o.mean().item()  # sync: the peer's design (one read per statistic per module)
                std = o.std().item()  # sync: idem
                near_zero = (o <= 0.05).float().mean().item()  # sync: idem
            self.stats.setdefault(name, []).append((mean, std, near_zero))

        return hook

    def teardown(self, trainer, pl_module, stage) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class NormsFloor(pl.Callback):
    """Reference, not a tool: each step's gradient norms with one ``_foreach_norm``, kept on device, nothing else.

    The floor of any monitor that looks at every step's gradients (gradwatch's per-step work is this plus
    a few small ops), so that the table shows how much of gradwatch's cost is the measurement itself.
    """

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.last = torch.stack(torch._foreach_norm(grads, 2))


class WandbWatch(pl.Callback):
    """``wandb.watch(model, log="all", log_freq=...)`` (offline), with a ``wandb.log`` commit every
    ``min(log_freq, log_every_n_steps)`` steps: at the trainer's logging cadence, as a ``WandbLogger``
    commits, and more often only when ``log_freq`` asks for it (``log_freq=1`` sends every step's
    histograms, which need a commit each step)."""

    def __init__(self, log_freq: int) -> None:
        self.log_freq = log_freq

    def on_fit_start(self, trainer, pl_module) -> None:
        import wandb

        wandb.watch(pl_module, log="all", log_freq=self.log_freq)
        self.every = min(self.log_freq, trainer.log_every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import wandb

        if trainer.global_step % self.every == 0:
            wandb.log({"trainer/global_step": trainer.global_step})

    def teardown(self, trainer, pl_module, stage) -> None:
        import wandb

        wandb.unwatch(pl_module)


class HFDebug(pl.Callback):
    """Hugging Face ``DebugUnderflowOverflow``: forward hooks on every module checking for inf/nan."""

    def on_fit_start(self, trainer, pl_module) -> None:
        from transformers.debug_utils import DebugUnderflowOverflow

        self.debug = DebugUnderflowOverflow(pl_module)

    def teardown(self, trainer, pl_module, stage) -> None:
        for m in pl_module.modules():  # it keeps no handles: remove its hooks from every module
            for key, hook in list(m._forward_hooks.items()):
                if getattr(hook, "__self__", None) is self.debug:
                    del m._forward_hooks[key]


def _have(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------------------------------ configs


@dataclass
class Config:
    name: str
    callbacks: Callable[[], list[pl.Callback]]
    what: str
    grad_norm: bool = False
    needs: str | None = None


def _exact_auto() -> list:
    """``remedies="auto"`` with the per-step skip decision (one host read per step)."""
    from gradwatch.findings import REMEDIES
    from gradwatch.remedies import SkipStep

    return [SkipStep(mode="exact") if name == "skip_step" else name for name in REMEDIES]


def configs() -> list[Config]:
    gw = gradwatch.HealthMonitor
    out = [
        Config("bare", lambda: [], "no monitor"),
        Config("default", lambda: [gw()], 'HealthMonitor(): remedies="auto", every 20 steps'),
        Config("observe", lambda: [gw(remedies="off")], 'HealthMonitor(remedies="off"): observing only'),
        Config("exact_skip", lambda: [gw(remedies=_exact_auto())], 'remedies="auto" with SkipStep(mode="exact")'),
    ]
    out += [
        Config(
            "every_step", lambda: [gw(remedies="off", every_n_steps=1)], "every_n_steps=1, observing only"
        ),
        Config(
            "every_100", lambda: [gw(remedies="off", every_n_steps=100)], "every_n_steps=100, observing only"
        ),
        Config(
            "scheduled",
            lambda: [gw(measure="scheduled")],
            'measure="scheduled": only every 20th step measured; rollback, reduce_lr, reinitialize, early_stop',
        ),
        Config(
            "scheduled_100",
            lambda: [gw(remedies="off", every_n_steps=100, measure="scheduled")],
            'measure="scheduled", every_n_steps=100, observing only',
        ),
        Config(
            "scheduled_100_norms",
            lambda: [
                gw(
                    remedies="off",
                    every_n_steps=100,
                    measure="scheduled",
                    activations=False,
                    inputs=False,
                    update_ratio=False,
                )
            ],
            "as scheduled_100, gradients and weights only (what wandb.watch looks at)",
        ),
        Config(
            "everything_on",
            lambda: [gw(remedies="off", every_n_steps=5, probe_every_n_steps=None, per_layer=True)],
            "per_layer; activations, inputs, update ratio at every read; every 5",
        ),
        Config(
            "totals_only",
            lambda: [gw(remedies="off", activations=False, inputs=False, update_ratio=False)],
            "no activations/inputs/update ratio, every 20",
        ),
        Config("norms_floor", lambda: [NormsFloor()], "reference: one _foreach_norm per step, nothing else"),
        Config("grad_norm", lambda: [], "Lightning grad_norm logged every step", grad_norm=True),
        Config("wandb_all_1", lambda: [WandbWatch(1)], 'wandb.watch(log="all", log_freq=1)', needs="wandb"),
        Config(
            "wandb_all_100", lambda: [WandbWatch(100)], 'wandb.watch(log="all", log_freq=100)', needs="wandb"
        ),
        Config("act_stats", lambda: [ActStats()], "fastai-style activation stats, .item() every step"),
        Config("hf_debug", lambda: [HFDebug()], "HF DebugUnderflowOverflow", needs="transformers"),
    ]
    return out


#: (peer, gradwatch config, what both do): the comparisons at the same logging frequency. The peers only
#: observe, so each is set against gradwatch observing (``remedies="off"``); the default, which also
#: repairs, is set against ``grad_norm`` too.
SAME_FREQUENCY = [
    ("grad_norm", "observe", "every step's gradient norms, observing"),
    ("grad_norm", "default", "every step's gradient norms; gradwatch also repairs"),
    ("wandb_all_1", "every_step", "every step, observing"),
    ("wandb_all_100", "scheduled_100", "one step in 100 measured, observing"),
    ("wandb_all_100", "scheduled_100_norms", "one step in 100, gradients and weights, observing"),
    ("wandb_all_100", "every_100", "every 100 steps; gradwatch still measures every step"),
]


# ------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class WindowTimer(pl.Callback):
    """Wall time from ``on_train_batch_start`` of step ``warmup`` to ``on_train_end`` (device synced), and
    the time at the start of step ``split`` in between (the end of the early window), if given. The
    process's CPU time (all its threads) is noted at the same points."""

    def __init__(self, warmup: int, split: int | None = None) -> None:
        self.warmup = warmup
        self.split = split
        self.t0: float | None = None
        self.t_split: float | None = None
        self.t1: float | None = None
        self.cpu0: float | None = None
        self.cpu_split: float | None = None
        self.cpu1: float | None = None
        self.peak_mem = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.t0 is None and trainer.global_step == self.warmup:
            _sync(pl_module.device)
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.t0 = time.perf_counter()
            self.cpu0 = time.process_time()
        elif self.t_split is None and self.split is not None and trainer.global_step == self.split:
            _sync(pl_module.device)
            self.t_split = time.perf_counter()
            self.cpu_split = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.t1 = time.perf_counter()
        self.cpu1 = time.process_time()
        if pl_module.device.type == "cuda":
            self.peak_mem = torch.cuda.max_memory_allocated(pl_module.device)


def run_once(
    wl: Workload, cfg: Config, warmup: int, early: int, steps: int, root: str
) -> tuple[float, float | None, int, float]:
    """One fit of ``warmup + early + steps`` steps; returns (seconds per step of the last ``steps`` steps,
    seconds per step of the ``early`` steps before them or None, peak device bytes, CPU seconds per
    step of the last ``steps`` steps)."""
    module = wl.module
    with torch.no_grad():
        module.load_state_dict(wl.initial)
    module.log_grad_norm = cfg.grad_norm
    timer = WindowTimer(warmup, warmup + early if early else None)
    trainer = pl.Trainer(
        max_steps=warmup + early + steps,
        logger=pl.loggers.TensorBoardLogger(root, name=cfg.name),
        callbacks=[timer, *cfg.callbacks()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
        **wl.trainer_kw,
    )
    trainer.fit(module, wl.loader)
    assert timer.t0 is not None and timer.t1 is not None, "the run ended before the timing window"
    if not early:
        return (timer.t1 - timer.t0) / steps, None, timer.peak_mem, (timer.cpu1 - timer.cpu0) / steps
    assert timer.t_split is not None and timer.cpu_split is not None
    return (
        (timer.t1 - timer.t_split) / steps,
        (timer.t_split - timer.t0) / early,
        timer.peak_mem,
        (timer.cpu1 - timer.cpu_split) / steps,
    )


# -------------------------------------------------------------------------------------------- main


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    parts = [
        f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"torch {torch.__version__}, pytorch-lightning {pl.__version__}, Python {platform.python_version()}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=["cpu", "gpt"], default="cpu")
    p.add_argument("--tiny", action="store_true", help="gpt: a tiny config, to smoke-test on CPU")
    p.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is available")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: cpu 7, gpt 3)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the timing window (default 20)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default cpu 200, gpt 40)")
    p.add_argument(
        "--early",
        type=int,
        default=None,
        help="steps of an early window timed apart, before the --steps window (default cpu 180: the "
        "window ends at step 200, where gradwatch's heavy probes turn sparse; gpt 0)",
    )
    p.add_argument("--budget-s", type=float, default=None, help="start no new round after this many seconds")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--configs", nargs="*", default=None, help="subset of configs (bare is always run)")
    args = p.parse_args(argv)

    gpt = args.workload == "gpt"
    rounds = args.rounds or (3 if gpt else 7)
    warmup = args.warmup if args.warmup is not None else (10 if gpt else 20)
    steps = args.steps or (40 if gpt else 200)
    early = args.early if args.early is not None else (0 if gpt else 180)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric", "gradwatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    print(machine())
    wl = make_workload(args)
    windows = f"early window: steps {warmup}-{warmup + early}, then " if early else ""
    print(
        f"workload {wl.name}: {wl.describe}; warm-up {warmup} steps, {windows}{steps} timed steps "
        f"(steps {warmup + early}-{warmup + early + steps}) per run"
    )

    chosen: list[Config] = []
    for cfg in configs():
        if args.configs is not None and cfg.name != "bare" and cfg.name not in args.configs:
            continue
        if cfg.needs and not _have(cfg.needs):
            print(f"note: skipping {cfg.name}: `{cfg.needs}` is not installed (pip install {cfg.needs})")
            continue
        chosen.append(cfg)

    root = tempfile.mkdtemp(prefix="gradwatch-overhead-")
    if any(c.needs == "wandb" for c in chosen):
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_DIR", root)
        wandb.init(project="gradwatch-overhead", mode="offline", dir=root)

    times: dict[str, list[float]] = {c.name: [] for c in chosen}
    early_times: dict[str, list[float]] = {c.name: [] for c in chosen}
    cpu_times: dict[str, list[float]] = {c.name: [] for c in chosen}
    peaks: dict[str, int] = {}
    stop: list[str] = []  # a SIGTERM (e.g. from `timeout`) ends the benchmark after the current run
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    start = time.perf_counter()
    done = 0
    for r in range(rounds + 1):  # round 0 warms up caches, allocators and imports: not counted
        if r > 1 and args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"note: time budget reached after {done} timed round(s)")
            break
        k = r % len(chosen)
        order = chosen[k:] + chosen[:k]  # rotate: no config always runs right after another
        got: dict[str, tuple[float, float | None, int, float]] = {}
        for cfg in order:
            if stop:
                break
            try:
                got[cfg.name] = run_once(wl, cfg, warmup, early, steps, root)
            except (KeyboardInterrupt, SystemExit) as err:  # Lightning turns SIGTERM into SystemExit
                stop.append(type(err).__name__)
        if len(got) < len(order):
            print(
                f"note: stopped ({stop[0] if stop else 'error'}) during round {r}: that round is not counted"
            )
            break
        if r > 0:
            for name, (t, t_early, peak, cpu) in got.items():
                times[name].append(t)
                cpu_times[name].append(cpu)
                if t_early is not None:
                    early_times[name].append(t_early)
                peaks[name] = max(peaks.get(name, 0), peak)
        done = r
        line = " ".join(f"{c.name}={got[c.name][0] * 1e3:.2f}" for c in order)
        print(f"round {r}{' (warm-up)' if r == 0 else ''}: {line} ms/step", flush=True)
    if done == 0:
        print("no timed round completed: no table")
        return 1

    bare = statistics.median(times["bare"])
    show_mem = any(peaks.values())
    show_cpu = wl.trainer_kw.get("accelerator") == "cpu"  # on a GPU the host CPU time says little
    cpu_bare = statistics.median(cpu_times["bare"])
    print()
    head = f"{'config':<20}{'ms/step':>9}{'ratio':>8}{'paired':>8}{'min':>8}{'max':>8}"
    head += f"{'early':>8}" if early else ""
    head += f"{'cpu':>8}" if show_cpu else ""
    print(head + (f"{'peak MiB':>10}" if show_mem else "") + "  what")
    for cfg in chosen:
        ts = times[cfg.name]
        med = statistics.median(ts)
        paired = statistics.median(a / b for a, b in zip(ts, times["bare"], strict=True))
        row = f"{cfg.name:<20}{med * 1e3:>9.2f}{med / bare:>7.2f}x{paired:>7.2f}x{min(ts) * 1e3:>8.2f}{max(ts) * 1e3:>8.2f}"
        if early:
            row += (
                f"{statistics.median(early_times[cfg.name]) / statistics.median(early_times['bare']):>7.2f}x"
            )
        if show_cpu:
            row += f"{statistics.median(cpu_times[cfg.name]) / cpu_bare:>7.2f}x"
        if show_mem:
            row += f"{peaks.get(cfg.name, 0) / 2**20:>10.0f}"
        print(row + f"  {cfg.what}")
    print(
        "\nratio: median step time / bare's median; paired: median over rounds of (run / bare run of the same round)"
    )
    if early:
        print(
            f"early: the same ratio over steps {warmup}-{warmup + early}, where the heavy probes run at every read"
        )
    if show_cpu:
        print(
            "cpu: the same ratio in the process's CPU time (all threads): what the run spent computing, "
            "not what other tenants of a shared machine took from it"
        )
    overhead = {name: statistics.median(ts) / bare - 1 for name, ts in times.items()}
    pairs = [p for p in SAME_FREQUENCY if p[0] in overhead and p[1] in overhead]
    if pairs:
        print("\nthe same logging frequency: how many times less overhead gradwatch adds than the peer")
    cpu_overhead = {name: statistics.median(ts) / cpu_bare - 1 for name, ts in cpu_times.items()}

    def times_less(over: dict[str, float], peer: str, ours: str) -> str:
        return f"{over[peer] / over[ours]:.1f}x" if over[ours] > 0 else "inf (no measurable overhead)"

    for peer, ours, what in pairs:
        cpu = f" (in CPU time: {times_less(cpu_overhead, peer, ours)})" if show_cpu else ""
        print(f"  {ours} vs {peer} ({what}): {times_less(overhead, peer, ours)}{cpu}")
    if "default" in times:
        ratio = statistics.median(times["default"]) / bare
        line = f"default overhead: {ratio:.2f}x bare (median of {len(times['default'])} interleaved runs"
        if early:
            e = statistics.median(early_times["default"]) / statistics.median(early_times["bare"])
            line += f", steps {warmup + early}-{warmup + early + steps}; {e:.2f}x over steps {warmup}-{warmup + early}"
        if show_cpu:
            line += f"; {statistics.median(cpu_times['default']) / cpu_bare:.2f}x in CPU time"
        print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
