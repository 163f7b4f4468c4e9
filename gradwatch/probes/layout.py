"""Which parameters gradwatch watches and how they group into layers (modules)."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.distributed import is_dtensor


def layer_of(param_name: str) -> str:
    """The module a parameter belongs to: ``"net.0.weight" -> "net.0"``; a top-level ``"scale" -> "scale"``."""
    head, _, _ = param_name.rpartition(".")
    return head or param_name


class ParamLayout:
    """The trainable parameters of a model in ``named_parameters`` order, and their layer grouping.

    Built once when the monitor binds to a model; per-layer reductions are one ``index_add_`` with
    :attr:`layer_index` instead of a Python loop over parameters.
    """

    def __init__(self, model: nn.Module) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names: list[str] = [n for n, _ in named]
        self.params: list[nn.Parameter] = [p for _, p in named]
        self.layers: list[str] = list(dict.fromkeys(layer_of(n) for n in self.names))
        position = {layer: i for i, layer in enumerate(self.layers)}
        self._layer_ids: list[int] = [position[layer_of(n)] for n in self.names]
        self.index_of: dict[int, int] = {id(p): i for i, p in enumerate(self.params)}
        self.device = self.params[0].device if self.params else torch.device("cpu")
        #: Parameters are sharded across ranks (FSDP2 / DTensor): probes measure local shards and the
        #: monitor adds their sums of squares up across ranks (see gradwatch.distributed).
        self.sharded: bool = any(is_dtensor(p) for p in self.params)
        self._layer_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.params)

    @property
    def layer_index(self) -> torch.Tensor:
        """Long tensor on the parameters' device: the layer id of each parameter."""
        if self._layer_index is None or self._layer_index.device != self.device:
            self._layer_index = torch.tensor(self._layer_ids, dtype=torch.long, device=self.device)
        return self._layer_index

    def per_layer(self, per_param: torch.Tensor) -> torch.Tensor:
        """Sum per-parameter values into per-layer values along the last dimension (e.g. squared norms into
        squared layer norms): ``[..., params] -> [..., layers]``, one ``index_add_`` for every row."""
        shape = (*per_param.shape[:-1], len(self.layers))
        out = torch.zeros(shape, dtype=per_param.dtype, device=per_param.device)
        return out.index_add_(per_param.dim() - 1, self.layer_index.to(per_param.device), per_param)

    def refresh_device(self) -> None:
        if self.params:
            self.device = self.params[0].device
