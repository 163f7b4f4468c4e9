"""``gradwatch.lightning.HealthMonitor``: the callback for the ``lightning`` package (``lightning.pytorch``).

Lightning checks ``isinstance(callback, Callback)`` against its own namespace, so users of
``lightning.pytorch.Trainer`` use this class and users of ``pytorch_lightning.Trainer`` use
``gradwatch.HealthMonitor``; both run the same hooks (:mod:`gradwatch.hooks`)::

    import lightning.pytorch as L
    import gradwatch.lightning

    trainer = L.Trainer(callbacks=[gradwatch.lightning.HealthMonitor()])
"""

from __future__ import annotations

import lightning.pytorch as L

from gradwatch.hooks import HealthMonitorHooks

__all__ = ["HealthMonitor"]


class HealthMonitor(HealthMonitorHooks, L.Callback):
    __doc__ = HealthMonitorHooks.__doc__
