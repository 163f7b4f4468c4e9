"""What kind of training run gradwatch is watching: precision, scaler, accumulation, optimizers, ranks.

:func:`describe_setup` is recorded once at fit start (logged at INFO and written in the summary under
``"setup"``). Remedies consult it: those that need Lightning's automatic optimization loop (skipping a
step, clipping through the trainer) must degrade to alerts when ``manual_optimization`` is true, and
:func:`needs_automatic_loop_message` gives them the sentence to say so.
"""

from __future__ import annotations

from typing import Any


def describe_setup(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """A plain, JSON-safe description of the run's setup.

    Keys: ``manual_optimization`` (bool), ``precision`` (e.g. ``"32-true"``, ``"bf16-mixed"``,
    ``"16-mixed"``), ``scaler`` (the GradScaler class name, or ``None``), ``accumulate_grad_batches``,
    ``num_optimizers``, ``param_groups`` (per optimizer), ``optimizers`` (class names),
    ``fused_unscaling`` (optimizers that unscale inside ``step``), ``lr_schedulers`` (class names),
    ``world_size``, ``strategy`` (class name), ``sharded_parameters`` and ``compiled``.
    """
    from gradwatch.distributed import is_dtensor
    from gradwatch.internals import is_compiled
    from gradwatch.probes.amp import optimizer_handles_unscaling, scaler_of

    optimizers = list(getattr(trainer, "optimizers", []) or [])
    plugin = getattr(trainer, "precision_plugin", None)
    scaler = scaler_of(trainer)
    schedulers = [type(c.scheduler).__name__ for c in (getattr(trainer, "lr_scheduler_configs", None) or [])]
    return {
        "manual_optimization": not bool(getattr(pl_module, "automatic_optimization", True)),
        "precision": str(getattr(plugin, "precision", getattr(trainer, "precision", "32-true"))),
        "scaler": type(scaler).__name__ if scaler is not None else None,
        "accumulate_grad_batches": int(getattr(trainer, "accumulate_grad_batches", 1)),
        "num_optimizers": len(optimizers),
        "optimizers": [type(o).__name__ for o in optimizers],
        "param_groups": [len(o.param_groups) for o in optimizers],
        "fused_unscaling": [type(o).__name__ for o in optimizers if optimizer_handles_unscaling(o)],
        "lr_schedulers": schedulers,
        "world_size": int(getattr(trainer, "world_size", 1)),
        "strategy": type(getattr(trainer, "strategy", None)).__name__,
        "sharded_parameters": any(is_dtensor(p) for p in pl_module.parameters()),
        "compiled": is_compiled(pl_module),
    }


def needs_automatic_loop_message(remedy: str, setup: dict[str, Any]) -> str | None:
    """If ``remedy`` cannot act in this setup, the sentence an alert should carry instead; else ``None``.

    Example:
        >>> needs_automatic_loop_message("skip_step", {"manual_optimization": True})[:60]
        'skip_step cannot act under manual optimization (automatic_op'
        >>> needs_automatic_loop_message("skip_step", {"manual_optimization": False}) is None
        True
    """
    if setup.get("manual_optimization"):
        return (
            f"{remedy} cannot act under manual optimization (automatic_optimization=False): your "
            "training_step calls optimizer.step() itself, so gradwatch only reports. Act on this finding "
            "in training_step (e.g. skip opt.step() or clip with self.clip_gradients(...))."
        )
    return None


def format_setup(setup: dict[str, Any]) -> str:
    """One log line: ``gradwatch: setup precision=16-mixed scaler=GradScaler ...``."""
    return "gradwatch: setup " + " ".join(f"{k}={v}" for k, v in setup.items())
