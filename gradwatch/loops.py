"""What ``Watch`` needs to know about plain PyTorch and Fabric loops: the wrapped objects, the
arguments it checks, the cross-rank skip decision, and how it describes the setup."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwatch.distributed import is_dtensor, world_size
from gradwatch.errors import ConfigError, check_positive_int
from gradwatch.internals import (
    fabric_scaler,
    is_compiled,
    is_fabric_module,
    optimizer_handles_unscaling,
    unwrap_model,
)

__all__ = ["check_loop", "describe_loop", "fabric_scaler", "reduce_any", "unwrap_model", "unwrap_optimizer"]

STATUSES = ("finished", "failed", "interrupted")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (which shares its ``param_groups``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def as_list(name: str, value: Any, ok: Any, example: str) -> list[Any]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    for item in items:
        if not ok(item):
            raise ConfigError(f"{name} got {item!r} ({type(item).__name__}). Write e.g. {example}.")
    return items


def check_loop(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    step_scheduler: Any,
    log_dir: Any,
    scaler: Any,
    log_every_n_steps: Any,
    tensorboard: Any,
) -> tuple[list[Any], list[Any], Any]:
    """Check ``Watch``'s own arguments; returns ``(optimizers, schedulers, Fabric's GradScaler or None)``."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. Write e.g. Watch(model, optimizer)."
        )
    optimizers = as_list(
        "optimizer",
        optimizer,
        lambda o: isinstance(o, torch.optim.Optimizer),
        "Watch(model, torch.optim.AdamW(model.parameters()))",
    )
    schedulers = (
        []
        if scheduler is None
        else as_list(
            "scheduler",
            scheduler,
            lambda s: callable(getattr(s, "step", None)),
            "scheduler=torch.optim.lr_scheduler.LambdaLR(...)",
        )
    )
    if not isinstance(step_scheduler, bool):
        raise ConfigError(f"step_scheduler must be True or False, got {step_scheduler!r}.")
    plateau = [s for s in schedulers if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)]
    if plateau and step_scheduler:
        raise ConfigError(
            "scheduler=ReduceLROnPlateau needs a metric, so Watch cannot step it after each optimizer step. "
            "Write step_scheduler=False and call scheduler.step(val_loss) yourself."
        )
    if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
        raise ConfigError(
            f"log_dir must be a path (str or os.PathLike) or None, got {log_dir!r} "
            f'({type(log_dir).__name__}). Write e.g. log_dir="runs/exp1".'
        )
    if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
        raise ConfigError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}.")
    check_positive_int("log_every_n_steps", log_every_n_steps, 50)
    if not (isinstance(tensorboard, bool) or callable(getattr(tensorboard, "add_scalar", None))):
        raise ConfigError(
            f"tensorboard must be True, False or a SummaryWriter, got {type(tensorboard).__name__}."
        )
    fabric = next((s for s in map(fabric_scaler, optimizers) if s is not None), None)
    if scaler is not None and fabric is not None:
        raise ConfigError(
            "scaler: Fabric's 16-mixed precision already scales the loss with its own GradScaler, which "
            "gradwatch finds through the optimizer. Write Watch(model, optimizer) without scaler=."
        )
    return optimizers, schedulers, fabric


def enabled(scaler: Any) -> Any | None:
    """``scaler`` if it is enabled, else ``None``."""
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscale(scaler: Any, optimizers: list[Any]) -> None:
    """``scaler.unscale_`` each optimizer, before gradwatch measures; fine if the user unscaled already."""
    if scaler is None:
        return
    for opt in optimizers:
        try:
            scaler.unscale_(opt)
        except RuntimeError as err:  # the user unscaled already (to clip, say): fine
            if "already been called" not in str(err):
                raise


def tensorboard_loggers(tensorboard: Any, log_dir: str | None) -> list[Any]:
    """``Watch(tensorboard=...)`` as loggers for the TensorBoard sink: a SummaryWriter given, or one in
    ``log_dir`` (``True``), or none."""
    from gradwatch.sinks.writer import TensorBoardLogger

    if tensorboard is not True and tensorboard is not False:
        return [TensorBoardLogger(tensorboard)]
    return [TensorBoardLogger(log_dir)] if tensorboard and log_dir is not None else []


def reduce_any(model: nn.Module) -> Any:
    """True on every rank if True on any rank: one small all-reduce, only when a step may be skipped."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")

    def reduce(decision: bool) -> bool:
        if world_size() <= 1:
            return decision
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([float(decision)], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)  # sync: the skip decision is needed now, on every rank

    return reduce


def describe_loop(
    model: nn.Module,
    module: nn.Module,
    optimizers: list[Any],
    schedulers: list[Any],
    scaler: Any,
    fabric: Any,
) -> dict[str, Any]:
    """The setup, with the keys of :func:`gradwatch.setups.describe_setup` where they apply."""
    return {
        "loop": "fabric" if is_fabric_module(model) else "plain",
        "manual_optimization": False,
        "epochs_counted": False,  # until watch.step(epoch=...): where epochs start (repeated_batch asks)
        "scaler": (
            type(scaler).__name__
            if scaler is not None
            else (f"{type(fabric).__name__} (Fabric)" if fabric is not None else None)
        ),
        "num_optimizers": len(optimizers),
        "optimizers": [type(o).__name__ for o in optimizers],
        "param_groups": [len(o.param_groups) for o in optimizers],
        "fused_unscaling": [type(o).__name__ for o in optimizers if optimizer_handles_unscaling(o)],
        "lr_schedulers": [type(s).__name__ for s in schedulers],
        "world_size": world_size(),
        "sharded_parameters": any(is_dtensor(p) for p in module.parameters()),
        "compiled": is_compiled(module),
    }
