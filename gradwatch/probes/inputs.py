"""Input probe: range of the batch the model sees, on sampled steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def first_float_tensor(batch: Any) -> torch.Tensor | None:
    """The first floating-point tensor in a batch (tensor, tuple/list, or dict), depth first."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.is_floating_point() else None
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            found = first_float_tensor(item)
            if found is not None:
                return found
    return None


def input_stats(batch: Any) -> torch.Tensor | None:
    """``[mean, std, max|x|]`` of the batch's first floating tensor, on its device, or ``None``."""
    x = first_float_tensor(batch)
    if x is None or x.numel() == 0:
        return None
    x = x.detach().float()
    std, mean = torch.std_mean(x) if x.numel() > 1 else (torch.zeros((), device=x.device), x.mean())
    return torch.stack([mean, std, x.abs().amax()])
