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
the host, a sync on every step). :func:`scale_tensor` is the one place that touches it;
``tests/test_setups.py::test_private_amp_access_is_pinned`` pins the torch versions it was checked with.
"""

from __future__ import annotations

from typing import Any

import torch


def scaler_of(trainer: Any) -> Any | None:
    """The enabled ``GradScaler`` of a Lightning trainer's precision plugin, or ``None`` (bf16, fp32)."""
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler


def scale_tensor(scaler: Any) -> torch.Tensor | None:
    """The scaler's current loss scale as a 0-d device tensor, without a host sync.

    Private access, isolated here: ``GradScaler._scale`` (torch 2.x; created lazily by the first
    ``scaler.scale(loss)``, so ``None`` before the first backward). ``get_scale()`` would ``.item()`` it.
    """
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)
    return scale.reshape(()) if isinstance(scale, torch.Tensor) else None


def optimizer_handles_unscaling(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales inside ``step`` (fused optimizers): then its gradients are still scaled.

    The same test Lightning uses (``lightning_fabric.plugins.precision.amp._optimizer_handles_unscaling``):
    torch's optimizers set ``_step_supports_amp_scaling = True`` when they do.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def amp_view(scaler: Any, optimizer: Any) -> tuple[torch.Tensor | None, bool]:
    """``(loss_scale, grads_scaled)`` at ``on_before_optimizer_step``, for the trainer's :func:`scaler_of`.

    ``loss_scale`` is the scaler's scale tensor (``None`` without a scaler); ``grads_scaled`` is True when
    the gradients have not been unscaled yet (a fused optimizer), so norms must be divided by the scale.
    """
    scale = scale_tensor(scaler)
    return scale, scale is not None and optimizer_handles_unscaling(optimizer)
