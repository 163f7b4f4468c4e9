"""Test helpers that users can reuse: count the host syncs a piece of code causes."""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.internals import TorchDispatchMode

_aten = torch.ops.aten
#: Ops that make the host wait for the device: ``.item()``, ``float()``, ``int()`` and ``bool()`` of a tensor.
SYNC_OPS = frozenset({_aten._local_scalar_dense.default, _aten.is_nonzero.default})


class SyncCounter(TorchDispatchMode):
    """Counts host syncs while active: scalar reads (``.item()``, ``float(t)``, ``bool(t)``) and copies from
    an accelerator to the CPU (``.cpu()``, ``.to("cpu")``).

    Example:
        >>> x = torch.ones(3)
        >>> with SyncCounter() as c:
        ...     y = (x * 2).sum()
        ...     _ = y.item()
        ...     _ = bool(y > 0)
        >>> c.count
        2
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in SYNC_OPS or self._device_to_host(func, args, kwargs):
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **kwargs)

    @staticmethod
    def _device_to_host(func: Any, args: Any, kwargs: Any) -> bool:
        if func not in (_aten._to_copy.default, _aten.copy_.default):
            return False
        src = args[1] if func is _aten.copy_.default else args[0]
        if func is _aten.copy_.default:
            dst_device = args[0].device
        else:
            dst_device = kwargs.get("device") or src.device
        return (
            isinstance(src, torch.Tensor)
            and src.device.type != "cpu"
            and torch.device(dst_device).type == "cpu"
        )
