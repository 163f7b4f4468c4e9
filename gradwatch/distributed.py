"""Cross-rank reduction of gradwatch's statistics: one stacked all-reduce per host read.

Every rank records its statistics on device. When the monitor reads them back (once per scheduled
step) the flat host-bound vector is all-reduced **once**, with ``SUM``, and then multiplied element-wise
by a per-element factor: ``1 / world_size`` for values that are the same kind of thing on every rank
and should be averaged (the loss, activation and input summaries, the norms of replicated parameters
whose gradients DDP has already averaged), ``1`` for sufficient statistics that add up across ranks
(sums of squares of *sharded* parameters, counts of non-finite steps). After the reduction every rank
holds the same numbers, so every rank's detectors take the same decision at the same step.

Sharded parameters (FSDP2 / ``DTensor``) are measured on their local shard (``to_local()``); the sum
of the shards' squared norms is the squared norm of the full tensor, so the norms come out right
(not off by ``sqrt(shards)``) without ever gathering a parameter.

Nothing here runs when ``torch.distributed`` is not initialized or the world has one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

#: Reduction modes a statistic can have: averaged over ranks, added up, or as the parameters are held:
#: averaged over replicas (DDP: every rank holds the same averaged gradient), added up over shards (FSDP).
MEAN, SUM, PARAM = "mean", "sum", "param"


def world_size() -> int:
    """Ranks in the default process group, or 1 when ``torch.distributed`` is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2 / tensor parallel)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds: the local shard of a ``DTensor``, else the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def sharded_sq_norms(local_sq: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum per-layer squared norms measured on local shards over the shard ``group``: the unsharded values.

    ``sqrt(sum over shards of ||shard||^2) = ||full tensor||``; averaging or taking each shard's norm
    would be off by ``sqrt(shards)``. One all-reduce for the whole vector; returns a new tensor.

    Args:
        local_sq: squared norms (any shape) of this rank's shards, on the process group's device.
        group: the shard group; default the default process group.

    Example:
        >>> sharded_sq_norms(torch.tensor([9.0, 16.0]))  # one process: nothing to add
        tensor([ 9., 16.])
    """
    out = local_sq.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def reduce_factors(
    specs: Sequence[tuple[int, Sequence[str]]], world: int, sharded: bool = False
) -> torch.Tensor:
    """The per-element factor applied after the ``SUM`` all-reduce.

    Args:
        specs: for each stacked tensor, ``(numel, modes)`` where ``modes`` holds one mode (for the whole
            tensor) or one mode per element of its last dimension (``numel`` must be a multiple).
        world: the number of ranks.
        sharded: the parameters are sharded, so ``PARAM`` values add up (else they are averaged).
    """
    mean = {MEAN, PARAM} if not sharded else {MEAN}
    parts = []
    for numel, modes in specs:
        per = torch.tensor([1.0 / world if m in mean else 1.0 for m in modes], dtype=torch.float32)
        parts.append(per.repeat(numel // len(modes)) if numel else per[:0])
    return torch.cat(parts) if parts else torch.zeros(0)


def all_reduce_stacked(flat: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One ``SUM`` all-reduce of the stacked vector, then the per-element factors (mean or sum).

    Every rank must call this at the same point (gradwatch reads on the same scheduled steps on
    every rank, so it does). Returns ``flat`` unchanged on a single process.
    """
    if world_size() <= 1:
        return flat
    flat = flat.contiguous().clone()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat * factors.to(flat.device, non_blocking=True)
