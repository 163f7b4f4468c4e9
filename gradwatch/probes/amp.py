"""AMP: where the loss scale lives, and whether the gradients gradwatch sees are still scaled.

With ``precision="16-mixed"`` Lightning's ``MixedPrecision`` plugin holds a ``torch.amp.GradScaler``
(``trainer.precision_plugin.scaler``, public). It multiplies the loss by the scale before backward and
normally *unscales* the gradients in place before ``on_before_optimizer_step``, so gradwatch reads true
gradients. Optimizers that unscale inside their own ``step`` (``_step_supports_amp_scaling``: fused
Adam/AdamW/SGD) are the exception: Lightning leaves their gradients scaled, and gradwatch divides the
squared norms by ``scale**2`` on device.

Skipped steps: when the scaler finds an Inf/NaN gradient it skips ``optimizer.step`` and multiplies the
scale by its ``backoff_factor`` (< 1) in ``update()``; it only ever lowers the scale for that reason.
gradwatch copies the scale tensor before the step and compares it with the scale after the batch, on
device: ``after < before`` marks the step as skipped by the scaler. No value is read back.

The scale as a device tensor is private (``GradScaler._scale``; the public ``get_scale()`` reads it to
the host, a sync on every step); :func:`gradwatch.internals.scaler_scale` is the one place that touches it,
and ``tests/test_internals.py`` pins it.
"""

from __future__ import annotations

from typing import Any

import torch

from gradwatch.internals import optimizer_handles_unscaling, scaler_scale

__all__ = ["amp_view", "optimizer_handles_unscaling", "scale_tensor", "scaler_of"]


def scaler_of(trainer: Any) -> Any | None:
    """The enabled ``GradScaler`` of a Lightning trainer's precision plugin, or ``None`` (bf16, fp32)."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


#: The scaler's current loss scale as a 0-d device tensor, without a host sync (private: see internals).
scale_tensor = scaler_scale


def amp_view(scaler: Any, optimizer: Any) -> tuple[torch.Tensor | None, bool]:
    """``(loss_scale, grads_scaled)`` at ``on_before_optimizer_step``, for the trainer's :func:`scaler_of`.

    ``loss_scale`` is the scaler's scale tensor (``None`` without a scaler); ``grads_scaled`` is True when
    the gradients have not been unscaled yet (a fused optimizer), so norms must be divided by the scale.
    """
    scale = scale_tensor(scaler)
    return scale, scale is not None and optimizer_handles_unscaling(optimizer)
