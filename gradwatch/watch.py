"""``Watch``: gradwatch for plain PyTorch loops and Lightning Fabric, no Trainer needed.

The same core (:class:`~gradwatch.monitor.Monitor`), findings, remedies, events file and TensorBoard tags
as the Lightning callback; only the adapter differs. The loop calls :meth:`Watch.step` instead of
``optimizer.step()`` (as with ``GradScaler.step``):

- a forward *pre-hook* on the model calls ``Monitor.batch_start`` on the first training-mode forward of
  each step (the input batch is read from the forward's arguments);
- ``watch.step(loss)``: ``scaler.unscale_`` -> ``Monitor.before_optimizer_step`` -> ``optimizer.step()``
  (or ``scaler.step`` + ``update``) -> ``scheduler.step()`` -> ``Monitor.batch_end(loss)``;
- ``watch.validation(val_loss)``: ``Monitor.validation_end``; early stopping sets ``watch.should_stop``;
- ``watch.close()`` / leaving the ``with`` block: ``Monitor.finish`` (summary) and every hook removed.
Like ``optimizer.step()``, ``watch.step`` does not zero the gradients.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwatch import state
from gradwatch.config import OPTIONS_DOC, Config
from gradwatch.distributed import replicated, world_size
from gradwatch.errors import ConfigError
from gradwatch.findings import Action, Finding
from gradwatch.hooks import _lr_of
from gradwatch.internals import unwrap_model
from gradwatch.loops import (
    STATUSES,
    check_loop,
    describe_loop,
    enabled,
    fabric_scaler,  # noqa: F401 - importable from here, as before
    reduce_any,
    tensorboard_loggers,
    unscale,
    unwrap_optimizer,
)
from gradwatch.monitor import Monitor, log
from gradwatch.probes.amp import scale_tensor
from gradwatch.remedies import Context
from gradwatch.setups import format_setup
from gradwatch.sinks.fanout import default_sinks

#: Watch's own keywords, besides the options every monitor takes (gradwatch/config.py).
LOOP_KEYWORDS = ("log_dir", "scheduler", "log_every_n_steps", "step_scheduler", "scaler", "tensorboard")


class Watch:
    __doc__ = f"""Watch a plain PyTorch (or Lightning Fabric) training loop: call ``watch.step(loss)`` instead of
    ``optimizer.step()``.

    Args:
        model: the module being trained (a Fabric- or DDP-wrapped module is fine).
        optimizer: its optimizer, or a list of optimizers stepped together (Fabric's wrappers are fine).
        log_dir: the events file goes to ``<log_dir>/gradwatch/events.jsonl``, TensorBoard event files to
            ``log_dir``. ``None``: no files (unless ``events_path`` is given); findings are still logged.
        scheduler: an LR scheduler, or a list; stepped after each optimizer step (``step_scheduler``). The
            ``reduce_lr`` multiplier rides on its ``step``, so the two compose.
        log_every_n_steps: per-step TensorBoard rows (loss, gradient norm, LR) every this many steps, and
            at every notable step (a finding, an action, a non-finite value); Lightning's default, 50.
        step_scheduler: ``False`` if you step the schedulers yourself (per epoch, or ReduceLROnPlateau
            with a metric); they are still handed to the remedies.
        scaler: a ``torch.amp.GradScaler``; may also be given to :meth:`step`.
        tensorboard: write TensorBoard event files in ``log_dir`` (a ``SummaryWriter``), or write through
            a ``SummaryWriter`` you pass here.

    Keyword-only options, as for ``HealthMonitor`` (gradwatch/config.py checks them):
{OPTIONS_DOC}

    Raises:
        ConfigError: on any bad argument, with what to write instead.

    Example::

        with gradwatch.Watch(model, optimizer, log_dir="runs/exp1") as watch:
            for x, y in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                watch.step(loss)  # instead of optimizer.step()
                if watch.should_stop:
                    break
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        log_dir: str | os.PathLike[str] | None = None,
        scheduler: Any = None,
        log_every_n_steps: int = 50,
        step_scheduler: bool = True,
        scaler: Any = None,
        tensorboard: Any = True,
        **options: Any,
    ) -> None:
        self.config = Config.build("Watch", options, extra=LOOP_KEYWORDS)
        optimizers, schedulers, fabric = check_loop(
            model, optimizer, scheduler, step_scheduler, log_dir, scaler, log_every_n_steps, tensorboard
        )
        self.monitor = Monitor(self.config)
        self.model = model
        self.module = unwrap_model(model)
        self.optimizers = optimizers  # stepped as given (Fabric's wrappers run its precision/strategy)
        self._raw_optimizers = [unwrap_optimizer(o) for o in optimizers]
        self.schedulers = schedulers
        self.step_scheduler = step_scheduler
        self.scaler = scaler
        #: Fabric's own GradScaler (``precision="16-mixed"``), which Fabric's optimizer wrapper steps.
        self.fabric_scaler = fabric
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.name = self.config.name
        #: The optimizer step the next :meth:`step` records (0 first), like ``trainer.global_step``.
        self.global_step = 0
        #: The epoch findings are filed under; set it (or pass ``epoch=`` to :meth:`step`) if you count epochs.
        self.epoch = 0
        #: True once ``early_stop`` acted: the loop should stop.
        self.should_stop = False
        #: The summary written by :meth:`close` (``None`` before).
        self.summary: dict[str, Any] | None = None
        self._forward_seen = False
        self._closed = False

        events_path = self.config.events_file
        if events_path is None and self.log_dir is not None:
            events_path = os.path.join(self.log_dir, "gradwatch", "events.jsonl")
        rank_zero = not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0
        self._loggers = tensorboard_loggers(tensorboard, self.log_dir) if rank_zero else []
        sinks = default_sinks(self.config, events_path, self._loggers, rank_zero)
        context = Context(
            model=self.module,
            optimizers=lambda: list(self._raw_optimizers),
            schedulers=lambda: list(self.schedulers),
            scaler=scaler if scaler is not None else self.fabric_scaler,
            request_stop=self._request_stop,
            automatic=True,
            reduce_any=reduce_any(self.module),
            world_size=world_size(),
            replicated=world_size() > 1 and replicated(self.model),  # DDP: rank 0 keeps the snapshots
        )
        setup = describe_loop(
            self.model, self.module, self._raw_optimizers, self.schedulers, self.scaler, self.fabric_scaler
        )
        meta = {"run": self.log_dir or self.name, "log_every_n_steps": log_every_n_steps}
        meta.update(events_path=events_path, setup=setup)
        self.monitor.bind(self.module, sinks, meta=meta, context=context)
        if self.monitor.sinks:
            log.debug(format_setup(self.monitor.setup))
        self._hook = self.module.register_forward_pre_hook(self._before_forward)

    # ------------------------------------------------------------------ public attributes
    @property
    def findings(self) -> list[Finding]:
        """The most recent findings (``gradwatch.journal.RECENT``), oldest first: the summary counts all."""
        return self.monitor.findings

    @property
    def actions(self) -> list[Action]:
        """The most recent remedy actions (``gradwatch.journal.RECENT``), oldest first."""
        return self.monitor.actions

    @property
    def events_path(self) -> str | None:
        return self.monitor.events_path

    # ------------------------------------------------------------------ the loop
    def _before_forward(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: the first training-mode forward of a step starts it (Monitor.batch_start)."""
        if self._forward_seen or self._closed or not module.training or not torch.is_grad_enabled():
            return
        self._forward_seen = True
        self.monitor.batch_start(self.global_step, args)

    def step(
        self, loss: torch.Tensor | float | None = None, *, scaler: Any = None, epoch: int | None = None
    ) -> list[Finding]:
        """Measure the gradients, let the remedies act, and step the optimizer(s) and scheduler(s).

        Call it after ``loss.backward()`` (``fabric.backward(loss)``, ``scaler.scale(loss).backward()``)
        instead of ``optimizer.step()``. The gradients are not zeroed, as with ``optimizer.step()``.

        Args:
            loss: this step's training loss (a tensor, kept on device: no sync), for the loss rules.
            scaler: a ``GradScaler``: gradwatch unscales the gradients (``scaler.unscale_``; fine if you
                already did), measures them, then calls ``scaler.step(optimizer)`` and ``scaler.update()``.
                Steps the scaler skips (Inf/NaN gradients) are counted as under the Trainer.
            epoch: the current epoch, if you count them (sets :attr:`epoch`).

        Returns:
            The findings new at this step (a scheduled step's read; usually empty).
        """
        if self._closed:
            raise RuntimeError("Watch.step() after Watch.close(): create a new Watch for a new run.")
        if epoch is not None:  # the loop counts epochs: a batch seen again an epoch later is not repeated
            self.epoch, self.monitor.setup["epochs_counted"] = int(epoch), True
        if scaler is not None and scaler is not self.scaler:
            self.scaler = scaler
            self.monitor.context.scaler = scaler
            self.monitor.setup["scaler"] = type(scaler).__name__
        scaler, fabric = enabled(self.scaler), enabled(self.fabric_scaler)
        # Fabric's scaler keys its state by the raw optimizer its precision plugin is handed
        if scaler is not None:
            unscale(scaler, self.optimizers)
        else:
            unscale(fabric, self._raw_optimizers)
        step = self.global_step
        if not self.monitor.pass_over(step, self.epoch):  # measure="scheduled": between scheduled steps
            params = [
                p for opt in self._raw_optimizers for group in opt.param_groups for p in group["params"]
            ]
            lr, scale = _lr_of(self._raw_optimizers[0]), scale_tensor(scaler or fabric)
            # grads_scaled=False: unscaled above, also for fused optimizers
            self.monitor.before_optimizer_step(step, self.epoch, params, lr, loss_scale=scale)
        for opt in self.optimizers:
            if scaler is not None:
                scaler.step(opt)
            else:
                opt.step()
        if scaler is not None:
            scaler.update()
        if self.step_scheduler:
            for sched in self.schedulers:
                sched.step()
        if loss is not None and not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss))
        self._forward_seen = False
        new = self.monitor.batch_end(loss, loss_scale=scale_tensor(scaler or fabric))
        self.global_step += 1
        return new

    def validation(self, val_loss: torch.Tensor | float) -> bool:
        """Feed the validation loss (after the last :meth:`step`), for ``overfitting`` and early stopping.

        Returns :attr:`should_stop`.
        """
        value = float(val_loss)  # sync: once per validation run
        self.monitor.validation_end(max(self.global_step - 1, 0), value)
        return self.should_stop

    def _request_stop(self) -> None:
        self.should_stop = True

    # ------------------------------------------------------------------ end of run
    def close(self, status: str = "finished") -> dict[str, Any] | None:
        """Read what is pending, write the summary, remove every hook. Safe to call twice.

        Returns the summary (also in :attr:`summary`).
        """
        if status not in STATUSES:
            raise ConfigError(f"status must be one of {', '.join(STATUSES)}, got {status!r}.")
        if self._closed:
            return self.summary
        self._closed = True
        self._hook.remove()
        try:
            self.summary = self.monitor.finish(status)
        finally:
            self.monitor.close()
            for logger in self._loggers:
                logger.close()
        return self.summary

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.close("finished")
        else:
            self.close("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes over a run: save it next to the model's and optimizer's state. Under DDP
        rank zero may call it alone: it runs no collective and changes nothing (the state of the last read,
        the same on every rank; the steps since are judged at the next read, not in a resumed run)."""
        # Monitor.state_dict reads the pending steps first, an all-reduce: a rank saving alone would hang
        monitor = self.monitor.state_dict() if world_size() <= 1 else state.save(self.monitor)
        return {
            "monitor": monitor,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: load the optimizer's state too (its learning rates include gradwatch's multiplier)."""
        self.monitor.load_state_dict(state.get("monitor", {}))
        self.global_step = int(state.get("global_step", 0))
        self.epoch = int(state.get("epoch", 0))
        self.should_stop = bool(state.get("should_stop", False))
