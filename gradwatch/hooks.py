"""The Lightning callback's logic, free of either Lightning package.

Lightning checks ``isinstance(callback, Callback)`` against its own namespace (``pytorch_lightning`` or
``lightning.pytorch``), so one class cannot be a callback of both. :class:`HealthMonitorHooks` holds every
hook and inherits from neither; ``gradwatch.HealthMonitor`` (``gradwatch/callback.py``) mixes it with
``pytorch_lightning.Callback`` and ``gradwatch.lightning.HealthMonitor`` with ``lightning.pytorch.Callback``.
Both call the same code on the same Trainer API, which the two packages share.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch

from gradwatch.config import OPTIONS_DOC, Config
from gradwatch.distributed import replicated
from gradwatch.monitor import Monitor, log
from gradwatch.probes.amp import amp_view, scale_tensor, scaler_of
from gradwatch.progress import ProgressStatus
from gradwatch.remedies import Context
from gradwatch.setups import describe_setup, format_setup
from gradwatch.sinks.fanout import default_sinks

VAL_LOSS_KEYS = ("val_loss", "val/loss", "validation_loss", "valid_loss", "loss/val")


def _loss_of(outputs: Any) -> torch.Tensor | None:
    """The training loss from ``training_step``'s output (a tensor, or a dict with ``"loss"``)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and isinstance(outputs.get("loss"), torch.Tensor):
        return outputs["loss"]
    return None


def _lr_of(optimizer: Any) -> float | None:
    groups = getattr(optimizer, "param_groups", None)
    lr = groups[0].get("lr") if groups else None
    return float(lr) if isinstance(lr, float | int) else None


def _stable(schedule: Any) -> str:
    """``every_n_steps`` as it goes into the state key: the same in every process (a function by its
    module and name, not by its repr, which holds a memory address)."""
    if inspect.isroutine(schedule):  # a function, lambda or method: by where it is defined
        return f"{getattr(schedule, '__module__', '')}.{schedule.__qualname__}"
    if isinstance(schedule, int) or type(schedule).__repr__ is not object.__repr__:
        return repr(schedule)  # an int, or an object that says what it is (EveryN(5))
    return f"{type(schedule).__module__}.{type(schedule).__qualname__}"


def _context(trainer: Any, pl_module: Any) -> Context:
    """The training objects remedies may touch, through Lightning's public API."""

    def stop() -> None:
        trainer.should_stop = True

    world = int(trainer.world_size)  # fixed for the fit; read once, not on every step's skip decision

    def reduce_any(decision: bool) -> bool:
        if world <= 1:
            return decision
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=False))

    return Context(
        model=pl_module,
        optimizers=lambda: list(trainer.optimizers),
        schedulers=lambda: [config.scheduler for config in trainer.lr_scheduler_configs],
        scaler=scaler_of(trainer),
        request_stop=stop,
        automatic=bool(pl_module.automatic_optimization),
        reduce_any=reduce_any,
        world_size=world,
        replicated=world > 1 and replicated(trainer.strategy.model),  # DDP: rank 0 keeps the snapshots
    )


class HealthMonitorHooks:
    __doc__ = f"""The hooks of ``HealthMonitor``, for either Lightning package (mixed with its ``Callback``).

    Watch a training run's health: gradients, weights, updates, activations, inputs and the loss.
    Keyword-only options (gradwatch/config.py checks them):

    Args:
{OPTIONS_DOC}

    Raises:
        ConfigError: on any bad argument or unknown option, with what to write instead.

    Example::

        trainer = Trainer(callbacks=[gradwatch.HealthMonitor()])  # pytorch_lightning.Trainer
        trainer = Trainer(callbacks=[gradwatch.lightning.HealthMonitor()])  # lightning.pytorch.Trainer
        trainer.fit(model, datamodule)
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.config = Config.build(type(self).__name__, options)
        self.monitor = Monitor(self.config)
        self.val_loss_key = self.config.val_loss_key
        self.name = self.config.name
        self._progress = ProgressStatus(lambda: self.monitor.journal.tally.severities)
        self._fitting = False
        self._scaler: Any = None  # the trainer's GradScaler, looked up once per fit
        self._summary: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public attributes
    @property
    def findings(self):  # noqa: ANN201 - list[Finding]
        """The most recent findings, in order (`gradwatch.journal.RECENT` of them; the summary counts all)."""
        return self.monitor.findings

    @property
    def actions(self):  # noqa: ANN201 - list[Action]
        """The most recent remedy actions, in order (`journal.RECENT` of them; the summary counts all)."""
        return self.monitor.actions

    @property
    def summary(self) -> dict[str, Any] | None:
        """The summary of the last finished fit (as ``Watch.summary``; ``None`` before one ends)."""
        return self._summary

    @property
    def events_path(self) -> str | None:
        """The events file of the current or last fit (known once fit starts)."""
        return self.monitor.events_path

    @property
    def state_key(self) -> str:
        # Lightning reads this several times per step: format it once
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._generate_state_key(name=self.name, every_n_steps=_stable(self.config.every_n_steps))
            self.__dict__["_state_key"] = key
        return key

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        events_path = self.config.events_file or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "gradwatch", "events.jsonl"
        )
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 1))
        sinks = default_sinks(self.config, events_path, trainer.loggers, trainer.is_global_zero)
        self._progress.attach(trainer)
        self._scaler = scaler_of(trainer)  # the precision plugin is set for the whole fit
        setup = describe_setup(trainer, pl_module)
        self.monitor.bind(
            pl_module,
            sinks,
            meta={
                "run": trainer.log_dir,
                "log_every_n_steps": every,
                "events_path": events_path,
                "setup": setup,
            },
            context=_context(trainer, pl_module),
        )
        if trainer.is_global_zero:
            log.debug(format_setup(setup))
        self._fitting = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._finish(status)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._fitting:
            self._finish("finished")
        self._progress.detach()
        self.monitor.close()

    def _finish(self, status: str) -> None:
        if self._fitting:
            self._fitting = False
            self._summary = self.monitor.finish(status)

    # ------------------------------------------------------------------ training hooks
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.monitor.batch_start(trainer.global_step, batch)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.monitor.pass_over(trainer.global_step, trainer.current_epoch):
            return  # measure="scheduled", between the scheduled steps
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss_scale, grads_scaled = amp_view(self._scaler, optimizer)
        self.monitor.before_optimizer_step(
            trainer.global_step,
            trainer.current_epoch,
            params,
            _lr_of(optimizer),
            loss_scale=loss_scale,
            grads_scaled=grads_scaled,
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.monitor.passing:  # measure="scheduled", between the scheduled steps: nothing to record
            self.monitor.batch_end(None)
            return
        loss = _loss_of(outputs)
        if loss is not None and pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            # Lightning hands back loss / accumulate_grad_batches: record the micro-batch's own loss
            loss = loss * trainer.accumulate_grad_batches
        self.monitor.batch_end(loss, loss_scale=scale_tensor(self._scaler))

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._fitting:
            return
        metrics = trainer.callback_metrics
        keys = [self.val_loss_key] if self.val_loss_key else VAL_LOSS_KEYS
        for key in keys:
            if key in metrics:
                step = max(trainer.global_step - 1, 0)  # the last optimizer step before this validation
                value = metrics[key]
                if trainer.world_size > 1:  # every rank must judge (and early-stop on) the same number
                    value = trainer.strategy.reduce(value.detach().float().clone(), reduce_op="mean")
                self.monitor.validation_end(step, float(value))  # sync: once per validation run
                return

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Lightning drops a callback's saved state silently when its key does not match: say so."""
        states = checkpoint.get("callbacks") or {}
        own = type(self).__qualname__ + "{"
        others = [k for k in states if isinstance(k, str) and k.startswith(own) and k != self.state_key]
        if self.state_key not in states and others:
            log.warning(
                "gradwatch: the checkpoint holds %s state under %s, not under this monitor's %s: it restores "
                "nothing. Give it the name= and every_n_steps of the run that saved the checkpoint.",
                type(self).__qualname__,
                ", ".join(others),
                self.state_key,
            )
