"""Input probe: range of the batch the model sees, on sampled steps."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def first_float_tensor(batch: Any) -> torch.Tensor | None:
    """The first dense floating-point tensor in a batch (tensor, tuple/list, or dict), depth first; sparse
    and nested tensors (a graph's adjacency) are passed over: their range is not an input scale, and
    reshaping one raised."""
    if isinstance(batch, torch.Tensor):
        dense = batch.layout == torch.strided and not batch.is_nested
        return batch if dense and batch.is_floating_point() else None
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
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    mean = flat.sum() / n
    # two passes (torch.std_mean is a slow single-threaded loop on CPU)
    std = torch.linalg.vector_norm(flat - mean) / math.sqrt(n - 1) if n > 1 else mean.new_zeros(())
    lo, hi = torch.aminmax(flat)
    return torch.stack([mean, std, torch.maximum(hi, lo.neg())])
