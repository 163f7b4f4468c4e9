"""``Watch``: gradwatch for plain PyTorch loops and Lightning Fabric, no Trainer needed.

The same core (:class:`~gradwatch.monitor.Monitor`), findings, remedies, events file and TensorBoard tags
as the Lightning callback; only the adapter differs. The callback maps Trainer hooks to Monitor calls;
here the loop calls :meth:`Watch.step` instead of ``optimizer.step()`` (as with ``GradScaler.step``):

- before the forward: a forward *pre-hook* on the model calls ``Monitor.batch_start`` on the first
  training-mode forward of each step (BatchNorm buffers kept for ``skip_step``; on scheduled steps the
  activation hooks are attached and the input batch's range is read from the forward's arguments);
- ``watch.step(loss)``: ``scaler.unscale_`` (with a GradScaler) -> ``Monitor.before_optimizer_step``
  (gradient norms, skip/clip decisions) -> ``optimizer.step()`` (or ``scaler.step`` + ``update``) ->
  ``scheduler.step()`` -> ``Monitor.batch_end(loss)`` (read back and judge on scheduled steps);
- ``watch.validation(val_loss)``: ``Monitor.validation_end``; early stopping sets ``watch.should_stop``;
- ``watch.close()`` / leaving the ``with`` block: ``Monitor.finish`` (summary) and every hook removed.

Like ``optimizer.step()``, ``watch.step`` does not zero the gradients: call ``optimizer.zero_grad()``
where you always did.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradwatch.detectors import Detector
from gradwatch.distributed import is_dtensor, world_size
from gradwatch.errors import ConfigError, check_positive_int
from gradwatch.findings import Action, Finding
from gradwatch.hooks import _lr_of
from gradwatch.monitor import Monitor, log
from gradwatch.probes.amp import optimizer_handles_unscaling, scale_tensor
from gradwatch.remedies import Context, Remedy
from gradwatch.schedules import Schedule
from gradwatch.setups import format_setup
from gradwatch.sinks import Console, EventsFile, Sink, TensorBoard
from gradwatch.sinks.alerts import Alerts, Target, check_targets

#: Wrappers whose ``.module`` is the user's model: Fabric's, DDP's, DataParallel's.
_WRAPPERS = ("_FabricModule", "DistributedDataParallel", "DataParallel")

STATUSES = ("finished", "failed", "interrupted")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric / DDP wrappers, so layer names match the Trainer's (``net.0``)."""
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Fabric's ``_FabricOptimizer`` (which shares its ``param_groups``)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def fabric_scaler(optimizer: Any) -> Any | None:
    """The GradScaler of Fabric's fp16 precision behind a ``_FabricOptimizer``, or ``None``.

    Fabric's wrapper steps through ``strategy.precision.optimizer_step``, which calls ``scaler.step`` and
    ``scaler.update`` itself; gradwatch only needs to unscale first (``scaler.unscale_`` marks the
    optimizer unscaled, so ``scaler.step`` does not unscale twice). Private access, isolated here: the
    wrapper's ``_strategy``; without it, ``None``.
    """
    precision = getattr(getattr(optimizer, "_strategy", None), "precision", None)
    scaler = getattr(precision, "scaler", None)
    return scaler if callable(getattr(scaler, "unscale_", None)) else None


def _as_list(name: str, value: Any, ok: Any, example: str) -> list[Any]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    for item in items:
        if not ok(item):
            raise ConfigError(f"{name} got {item!r} ({type(item).__name__}). Write e.g. {example}.")
    return items


def _reduce_any(device: torch.device) -> Any:
    """True on every rank if True on any rank: one small all-reduce, only when a step may be skipped."""

    def reduce(decision: bool) -> bool:
        if world_size() <= 1:
            return decision
        on = device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([float(decision)], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)  # sync: the skip decision is needed now, on every rank

    return reduce


class Watch:
    """Watch a plain PyTorch (or Lightning Fabric) training loop: call ``watch.step(loss)`` instead of
    ``optimizer.step()``.

    Args:
        model: the module being trained (a Fabric- or DDP-wrapped module is fine).
        optimizer: its optimizer, or a list of optimizers stepped together (Fabric's wrappers are fine).
        remedies: ``"auto"``, ``"off"`` or a list of remedy ids / Remedy objects, as for ``HealthMonitor``.
        log_dir: where to write: the events file at ``<log_dir>/gradwatch/events.jsonl`` and TensorBoard
            event files in ``log_dir``. ``None``: no files (unless ``events_path`` is given); findings are
            still logged and kept in :attr:`findings`.
        scheduler: an LR scheduler, or a list; stepped after each optimizer step (``step_scheduler``). The
            ``reduce_lr`` multiplier rides on its ``step``, so the two compose.
        every_n_steps, probe_every_n_steps: statistics and heavy-probe cadence, as for ``HealthMonitor``.
        log_every_n_steps: per-step TensorBoard rows (loss, gradient norm, LR) every this many steps, and
            at every notable step (a finding, an action, a non-finite value); Lightning's default, 50.
        step_scheduler: ``False`` if you step the schedulers yourself (per epoch, or ReduceLROnPlateau
            with a metric); they are still handed to the remedies.
        scaler: a ``torch.amp.GradScaler``; may also be given to :meth:`step`.
        events_path: the events file, instead of the one under ``log_dir``.
        tensorboard: write TensorBoard event files in ``log_dir`` (a ``SummaryWriter``), or write through
            a ``SummaryWriter`` you pass here.
        per_layer, activations, inputs, update_ratio, detectors, print_summary, snapshot_every, snapshots,
            alert_url, alerts, name, measure: as for ``HealthMonitor`` (``name`` names the run in alerts).

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
        remedies: str | list[str | Remedy] = "auto",
        log_dir: str | os.PathLike[str] | None = None,
        scheduler: Any = None,
        every_n_steps: int | Schedule = 20,
        probe_every_n_steps: int | None = 100,
        log_every_n_steps: int = 50,
        step_scheduler: bool = True,
        scaler: Any = None,
        events_path: str | os.PathLike[str] | None = None,
        tensorboard: Any = True,
        per_layer: bool = False,
        activations: bool = True,
        inputs: bool = True,
        update_ratio: bool = True,
        detectors: Iterable[Detector] | None = None,
        print_summary: bool = True,
        snapshot_every: int | None = None,
        snapshots: int = 2,
        alert_url: str | None = None,
        alerts: Iterable[Target] | None = None,
        name: str | None = None,
        measure: str = "every_step",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"model must be a torch.nn.Module, got {type(model).__name__}. Write e.g. Watch(model, optimizer)."
            )
        optimizers = _as_list(
            "optimizer",
            optimizer,
            lambda o: isinstance(o, torch.optim.Optimizer),
            "Watch(model, torch.optim.AdamW(model.parameters()))",
        )
        schedulers = (
            []
            if scheduler is None
            else _as_list(
                "scheduler",
                scheduler,
                lambda s: callable(getattr(s, "step", None)),
                "scheduler=torch.optim.lr_scheduler.LambdaLR(...)",
            )
        )
        if not isinstance(step_scheduler, bool):
            raise ConfigError(f"step_scheduler must be True or False, got {step_scheduler!r}.")
        plateau = [s for s in schedulers if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)]
        if plateau and step_scheduler:
            raise ConfigError(
                "scheduler=ReduceLROnPlateau needs a metric, so Watch cannot step it after each optimizer step. "
                "Write step_scheduler=False and call scheduler.step(val_loss) yourself."
            )
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise ConfigError(
                f"log_dir must be a path (str or os.PathLike) or None, got {log_dir!r} "
                f'({type(log_dir).__name__}). Write e.g. log_dir="runs/exp1".'
            )
        if scaler is not None and not callable(getattr(scaler, "unscale_", None)):
            raise ConfigError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}.")
        self.monitor = Monitor(
            remedies=remedies,
            every_n_steps=every_n_steps,
            probe_every_n_steps=probe_every_n_steps,
            alert_url=alert_url,
            events_path=events_path,
            per_layer=per_layer,
            activations=activations,
            inputs=inputs,
            update_ratio=update_ratio,
            detectors=detectors,
            print_summary=print_summary,
            snapshot_every=snapshot_every,
            snapshots=snapshots,
            measure=measure,
        )
        self.monitor.log_every_n_steps = check_positive_int("log_every_n_steps", log_every_n_steps, 50)
        alert_targets = check_targets(alert_url, alerts)
        if not (isinstance(tensorboard, bool) or callable(getattr(tensorboard, "add_scalar", None))):
            raise ConfigError(
                f"tensorboard must be True, False or a SummaryWriter, got {type(tensorboard).__name__}."
            )

        self.model = model
        self.module = unwrap_model(model)
        self.optimizers = optimizers  # stepped as given (Fabric's wrappers run its precision/strategy)
        self._raw_optimizers = [unwrap_optimizer(o) for o in optimizers]
        self.schedulers = schedulers
        self.step_scheduler = step_scheduler
        self.scaler = scaler
        #: Fabric's own GradScaler (``precision="16-mixed"``), which Fabric's optimizer wrapper steps.
        self.fabric_scaler = next((s for s in map(fabric_scaler, optimizers) if s is not None), None)
        if scaler is not None and self.fabric_scaler is not None:
            raise ConfigError(
                "scaler: Fabric's 16-mixed precision already scales the loss with its own GradScaler, which "
                "gradwatch finds through the optimizer. Write Watch(model, optimizer) without scaler=."
            )
        self.log_dir = os.fspath(log_dir) if log_dir is not None else None
        self.name = name
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

        if events_path is None and self.log_dir is not None:
            self.monitor.events_path = os.path.join(self.log_dir, "gradwatch", "events.jsonl")
        self._loggers: list[Any] = []
        sinks: list[Sink] = []
        if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:  # rank zero writes
            from gradwatch.sinks.writer import TensorBoardLogger

            if tensorboard is not True and tensorboard is not False:
                self._loggers.append(TensorBoardLogger(tensorboard))
            elif tensorboard and self.log_dir is not None:
                self._loggers.append(TensorBoardLogger(self.log_dir))
            if self.monitor.events_path is not None:
                sinks.append(EventsFile(self.monitor.events_path))
            sinks += [TensorBoard(self._loggers), Console(print_summary)]
            if alert_targets:
                sinks.append(Alerts(alert_targets, run=name))
        first = next(self.module.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        context = Context(
            model=self.module,
            optimizers=lambda: list(self._raw_optimizers),
            schedulers=lambda: list(self.schedulers),
            scaler=scaler if scaler is not None else self.fabric_scaler,
            request_stop=self._request_stop,
            automatic=True,
            reduce_any=_reduce_any(device),
            world_size=world_size(),  # under DDP every rank keeps the same snapshots (step-only cadence)
        )
        self.monitor.bind(self.module, sinks, meta={"run": self.log_dir or name}, context=context)
        self.monitor.setup = self._describe()
        if self.monitor.sinks:
            log.info(format_setup(self.monitor.setup))
        self._hook = self.module.register_forward_pre_hook(self._before_forward)

    # ------------------------------------------------------------------ public attributes
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, in order."""
        return self.monitor.findings

    @property
    def actions(self) -> list[Action]:
        """Every remedy action so far, in order."""
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
        if epoch is not None:
            self.epoch = int(epoch)
        if scaler is not None and scaler is not self.scaler:
            self.scaler = scaler
            self.monitor.context.scaler = scaler
            self.monitor.setup["scaler"] = type(scaler).__name__
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        fabric = (
            self.fabric_scaler if self.fabric_scaler is not None and self.fabric_scaler.is_enabled() else None
        )
        # Fabric's scaler keys its state by the raw optimizer its precision plugin is handed
        unscaler, targets = (
            (scaler, self.optimizers) if scaler is not None else (fabric, self._raw_optimizers)
        )
        if unscaler is not None:
            for opt in targets:
                try:
                    unscaler.unscale_(opt)
                except RuntimeError as err:  # the user unscaled already (to clip, say): fine
                    if "already been called" not in str(err):
                        raise
        step = self.global_step
        if not self.monitor.pass_over(step, self.epoch):  # measure="scheduled": between scheduled steps
            params = [
                p for opt in self._raw_optimizers for group in opt.param_groups for p in group["params"]
            ]
            self.monitor.before_optimizer_step(
                step,
                self.epoch,
                params,
                _lr_of(self._raw_optimizers[0]),
                loss_scale=scale_tensor(scaler or fabric),
                grads_scaled=False,  # unscaled above, also for fused optimizers
            )
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
        """Everything that changes over a run: save it next to the model's and optimizer's state."""
        return {
            "monitor": self.monitor.state_dict(),
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

    def _describe(self) -> dict[str, Any]:
        """The setup, with the keys of :func:`gradwatch.setups.describe_setup` where they apply."""
        opts = self._raw_optimizers
        fabric = type(self.model).__name__ == "_FabricModule"
        return {
            "loop": "fabric" if fabric else "plain",
            "manual_optimization": False,
            "scaler": (
                type(self.scaler).__name__
                if self.scaler is not None
                else (
                    f"{type(self.fabric_scaler).__name__} (Fabric)"
                    if self.fabric_scaler is not None
                    else None
                )
            ),
            "num_optimizers": len(opts),
            "optimizers": [type(o).__name__ for o in opts],
            "param_groups": [len(o.param_groups) for o in opts],
            "fused_unscaling": [type(o).__name__ for o in opts if optimizer_handles_unscaling(o)],
            "lr_schedulers": [type(s).__name__ for s in self.schedulers],
            "world_size": world_size(),
            "sharded_parameters": any(is_dtensor(p) for p in self.module.parameters()),
            "compiled": any(type(m).__name__ == "OptimizedModule" for m in self.module.modules()),
        }
