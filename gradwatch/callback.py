"""``HealthMonitor``: the Lightning callback, a thin adapter from Trainer hooks to :class:`Monitor`.

This is the ``pytorch_lightning`` callback (``gradwatch.HealthMonitor``); ``gradwatch.lightning.HealthMonitor``
is the same callback for ``lightning.pytorch``. The hooks live in :mod:`gradwatch.hooks`.
"""

from __future__ import annotations

import pytorch_lightning as pl

from gradwatch.hooks import VAL_LOSS_KEYS, HealthMonitorHooks, _context, _loss_of, _lr_of

__all__ = ["VAL_LOSS_KEYS", "HealthMonitor", "_context", "_loss_of", "_lr_of"]


class HealthMonitor(HealthMonitorHooks, pl.Callback):
    __doc__ = HealthMonitorHooks.__doc__
