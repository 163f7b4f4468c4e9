"""TensorBoard for loops without a Lightning logger: a ``SummaryWriter`` behind a logger's face.

The :class:`~gradwatch.sinks.tensorboard.TensorBoard` sink writes through Lightning loggers
(``log_metrics(metrics, step)`` and ``experiment.add_text`` / ``add_custom_scalars`` / ``flush``).
:class:`TensorBoardLogger` gives ``torch.utils.tensorboard.SummaryWriter`` that face, so a plain PyTorch or
Fabric loop (:class:`gradwatch.Watch`) gets the same tags, text and Custom Scalars layout as a Trainer run
with the sink unchanged. It is named like Lightning's logger because the sink recognizes TensorBoard
loggers by that class name, from either Lightning package.
"""

from __future__ import annotations

import os
from typing import Any


class TensorBoardLogger:
    """The slice of Lightning's ``TensorBoardLogger`` that gradwatch's TensorBoard sink uses.

    Args:
        log_dir: the directory the event files go to (``SummaryWriter(log_dir)``), or an existing
            ``SummaryWriter`` to write through (it is then not closed by :meth:`close`).
    """

    def __init__(self, log_dir: str | os.PathLike[str] | Any) -> None:
        if isinstance(log_dir, str | os.PathLike):
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is heavy

            self.experiment = SummaryWriter(os.fspath(log_dir))
            self._owned = True
        else:
            self.experiment = log_dir
            self._owned = False
        self.log_dir = getattr(self.experiment, "log_dir", None) or self.experiment.get_logdir()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():  # host floats: the monitor logs what it already read back
            self.experiment.add_scalar(tag, float(value), global_step=step)

    def close(self) -> None:
        self.experiment.flush()
        if self._owned:
            self.experiment.close()
