"""Every private torch / Lightning access gradwatch makes, in one place.

Each function here leans on something that is not public API: a ``torch._foreach_*`` kernel, an
attribute behind an underscore, or a class recognised by its name (so that gradwatch works with either
Lightning package, or without Fabric installed). ``tests/test_internals.py`` pins every one of them
against the installed versions; when an upgrade breaks one, that test says which.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401 - gradwatch.testing's sync counter

#: Wrappers whose ``.module`` is the user's model: Fabric's, DDP's, DataParallel's (by class name).
WRAPPERS = ("_FabricModule", "DistributedDataParallel", "DataParallel")


# ---------------------------------------------------------------------------------------------- torch


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor in float32, one fused kernel per device and dtype (``torch._foreach_norm``)."""
    return torch._foreach_norm(tensors, 2, dtype=torch.float32)


def foreach_norm_native(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of each tensor in its own precision (``torch._foreach_norm`` without a dtype): float64 for
    float64, and real for complex tensors (float32 for complex64, float64 for complex128)."""
    return torch._foreach_norm(tensors, 2)


def foreach_mul_(tensors: list[torch.Tensor], factor: torch.Tensor | float) -> None:
    """Scale every tensor in place (``torch._foreach_mul_``; a 0-d tensor factor needs no host read)."""
    torch._foreach_mul_(tensors, factor)


def foreach_copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A copy of every tensor (``torch._foreach_mul(tensors, 1.0)``: one kernel, not one per tensor)."""
    return torch._foreach_mul(tensors, 1.0)


def foreach_sub(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """``a - b`` element by element (``torch._foreach_sub``)."""
    return torch._foreach_sub(a, b)


def foreach_copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """Copy ``src`` into ``dst`` in place (``torch._foreach_copy_``)."""
    torch._foreach_copy_(dst, src)


def scaler_scale(scaler: Any) -> torch.Tensor | None:
    """A ``GradScaler``'s loss scale as a 0-d device tensor, without the host read ``get_scale()`` makes.

    ``GradScaler._scale`` (torch 2.x) is created by the first ``scaler.scale(loss)``: ``None`` before.
    """
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return scale.reshape(()) if isinstance(scale, torch.Tensor) else None


def optimizer_handles_unscaling(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales inside ``step`` (fused optimizers): its gradients are still scaled.

    The test Lightning uses (``lightning_fabric.plugins.precision.amp._optimizer_handles_unscaling``).
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def arm_found_inf(optimizer: torch.optim.Optimizer, flag: torch.Tensor) -> None:
    """Hand a fused optimizer a skip flag the way ``GradScaler.step`` does: ``found_inf`` (1.0: skip the
    step) and ``grad_scale=None``; the fused kernels read both from the optimizer's attributes."""
    flag._gradwatch_skip = True  # ours: clear_found_inf leaves a GradScaler's own flag alone
    optimizer.grad_scale = None
    optimizer.found_inf = flag


def clear_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Take a flag :func:`arm_found_inf` set off the optimizer (not one a GradScaler set)."""
    state = vars(optimizer)
    if getattr(state.get("found_inf"), "_gradwatch_skip", False):
        del state["found_inf"]
        if "grad_scale" in state and state["grad_scale"] is None:
            del state["grad_scale"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` holds a ``torch.compile``d module (``OptimizedModule``, by class name)."""
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric / DDP wrappers, so layer names match the Trainer's (``net.0``)."""
    while type(model).__name__ in WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_fabric_module(model: nn.Module) -> bool:
    return type(model).__name__ == "_FabricModule"


# ------------------------------------------------------------------------------------ Lightning, Fabric
def is_tensorboard_logger(logger: Any) -> bool:
    """True for Lightning's TensorBoardLogger from either package (by class name), or gradwatch's own."""
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def event_file_writer(logger: Any) -> Any | None:
    """The event-file writer behind a TensorBoardLogger (``SummaryWriter._get_file_writer()``), to write
    a step's scalars as one event; ``None`` for a prefixed logger (``_prefix``) or another writer."""
    if not is_tensorboard_logger(logger) or getattr(logger, "_prefix", ""):
        return None
    get = getattr(logger.experiment, "_get_file_writer", None)
    writer = get() if callable(get) else None
    return writer if callable(getattr(writer, "add_summary", None)) else None


def fabric_scaler(optimizer: Any) -> Any | None:
    """The GradScaler of Fabric's fp16 precision behind a ``_FabricOptimizer`` (its ``_strategy``), or
    ``None``. Fabric's wrapper calls ``scaler.step`` and ``scaler.update`` itself."""
    precision = getattr(getattr(optimizer, "_strategy", None), "precision", None)
    scaler = getattr(precision, "scaler", None)
    return scaler if callable(getattr(scaler, "unscale_", None)) else None
