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

Statistics that only some ranks have (a module skipped on one rank: a conditional branch, a mixture of
experts) travel in a fixed layout, the same on every rank, with a count: they are added up (``SUM``) and
divided by the count of ranks that had them.

Rollback snapshots of replicated models (DDP) are kept by rank 0 alone; :func:`broadcast_state` hands
a restored state to the other ranks.

Nothing here runs when ``torch.distributed`` is not initialized or the world has one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def rank() -> int:
    """This process's rank in the default process group, or 0 when ``torch.distributed`` is not in use."""
    return dist.get_rank() if world_size() > 1 else 0


#: Set at each read: the latest read was this rank's alone (a failing run's last read), so what follows
#: it must not wait on the other ranks (no collective).
_alone = [False]


def read_alone(alone: bool) -> None:
    """Note whether the read just made was all-reduced across the ranks (``False``) or this rank's alone."""
    _alone[0] = alone


def together() -> bool:
    """Several ranks, and the latest read was all-reduced across them: a collective now lines up."""
    return world_size() > 1 and not _alone[0]


def replicated(model: Any) -> bool:
    """Whether ``model`` is a ``DistributedDataParallel`` module, or Fabric's wrapper of one: every rank
    holds the same parameters, buffers and (with a plain optimizer) optimizer state. FSDP, DeepSpeed and
    tensor-parallel wrappers are not: each rank holds its own part."""
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(4):  # _FabricModule -> DistributedDataParallel -> the user's module
        if isinstance(model, DistributedDataParallel):
            return True
        inner = getattr(model, "_forward_module", None)  # Fabric's wrapper: what forward runs through
        model = inner if isinstance(inner, torch.nn.Module) else getattr(model, "module", None)
    return False


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


class _Spec(tuple):
    """A tensor's place in a broadcast structure: ``(shape, dtype)``."""


def _skeleton(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _Spec((tuple(obj.shape), obj.dtype))
    if isinstance(obj, dict):
        return {k: _skeleton(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_skeleton(v) for v in obj)
    return obj


def broadcast_state(state: Any, device: torch.device, src: int = 0) -> Any:
    """Rank ``src``'s ``state`` (nested dicts, lists and tuples of CPU tensors and plain values) on every
    rank, as CPU tensors: its structure in one object broadcast, then one ``broadcast`` per tensor (through
    ``device``: the GPU under NCCL, one tensor at a time). ``state`` is ignored on the other ranks. Every
    rank must call it at the same point. Cost: a copy of the state over the network; for a rollback.
    """
    me = dist.get_rank()
    box = [_skeleton(state) if me == src else None]
    dist.broadcast_object_list(box, src=src)

    def fill(spec: Any, mine: Any) -> Any:
        if isinstance(spec, _Spec):
            shape, dtype = spec
            buf = mine.to(device) if me == src else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buf, src=src)
            return mine if me == src else buf.to("cpu", copy=True)  # sync (from a GPU): a rollback, rare
        if isinstance(spec, dict):
            return {k: fill(v, mine[k] if me == src else None) for k, v in spec.items()}
        if isinstance(spec, list | tuple):
            return type(spec)(fill(v, mine[i] if me == src else None) for i, v in enumerate(spec))
        return spec

    return fill(box[0], state)
