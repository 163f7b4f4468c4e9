"""The Lightning-free core: the wiring of probes -> recorder -> one read -> detectors -> remedies -> sinks.

``Monitor`` knows nothing of a trainer. An adapter (the Lightning callback, or ``Watch``) calls
:meth:`~Monitor.bind` once a model exists; per batch :meth:`~Monitor.batch_start` before the forward,
:meth:`~Monitor.pass_over` and (unless it says the step is passed over) :meth:`~Monitor.before_optimizer_step`
with the gradients final, :meth:`~Monitor.batch_end` after the batch; :meth:`~Monitor.validation_end` with
the validation loss; :meth:`~Monitor.finish` at the end. Per step the recorder keeps a few device tensors,
read back in one stacked transfer on a scheduled step. Each part has one owner: docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from gradwatch import state
from gradwatch.cadence import Cadence
from gradwatch.config import Config
from gradwatch.errors import ConfigError
from gradwatch.findings import Action, Finding
from gradwatch.journal import Journal, recent
from gradwatch.judge import Judge
from gradwatch.probes.probe_set import ProbeSet
from gradwatch.read import read
from gradwatch.recorder import MAX_PENDING_ROWS, Recorder
from gradwatch.remedies import (
    BestWeights,
    Context,
    LRControl,
    RemedyContext,
    Responder,
    Snapshots,
    StepGuard,
)
from gradwatch.sinks import Sink
from gradwatch.sinks.fanout import SinkSet
from gradwatch.sinks.summary import Ranges, run_summary
from gradwatch.stats import Stats

log = logging.getLogger("gradwatch")


class Monitor:
    """Training-health monitor core. Takes the options of :class:`gradwatch.config.Config` (or one)."""

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        if config is not None and options:
            raise ConfigError(
                f"Monitor(config, ...): give a Config or options, not both (got {sorted(options)})."
            )
        self.config = cfg = config or Config.build("Monitor", options)
        self.remedies = cfg.remedy_list
        self.detectors = cfg.detector_list
        self.cadence = Cadence(cfg.schedule, cfg.every_step, cfg.probe_every_n_steps)
        self.events_path = cfg.events_file
        self.last_stats: Stats | None = None  # the latest host read's (what the detectors last judged)
        self.sinks, self.journal = SinkSet(), Journal()  # where findings go; what is kept of them (totals)
        self.steps_seen, self.last_step, self.last_epoch, self.summary_ranges = 0, -1, 0, Ranges()
        self.setup: dict[str, Any] = {}  # the training setup (precision, scaler, ...): the summary's "setup"
        snapshots = Snapshots.every(cfg.snapshot_every, keep=cfg.snapshots)
        self.remedy_ctx = RemedyContext(LRControl(), snapshots, BestWeights(), activity=self.unit_activity)
        files = (self._publish, self.record_action, self._history, self.journal.evidence)
        self.responder = Responder(self.remedies, self.remedy_ctx, *files)
        self.guard = StepGuard(self.remedies, self.responder, MAX_PENDING_ROWS)
        self.remedy_ctx.skipping = self.guard.skip is not None
        self.judge = Judge(self.detectors, self.responder.validation_rules)
        self.responder.on_rewind = self.judge.rewind
        self.recorder = Recorder()
        self.probes: ProbeSet | None = None  # once bound to a model
        self.pending_val_loss: float | None = None  # the last validation's, until a read carries it
        self._resumed = False  # load_state_dict ran: the next bind continues that run
        self._snapshot_at_start = False  # resumed: the first batch's (restored) state is kept for rollback
        self.deferred: list[Finding] = []  # judged while a checkpoint was written: answered at the next read

    def __getattr__(self, name: str) -> Any:  # the options, as read-only attributes: monitor.per_layer, ...
        config = self.__dict__.get("config")
        if config is not None and not name.startswith("_") and hasattr(config, name):
            return getattr(config, name)
        remedy = next((r for r in self.__dict__.get("remedies", ()) if r.name == name), None)
        if remedy is not None:  # monitor.rollback, monitor.early_stop, ...
            return remedy
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    findings, actions = recent("findings"), recent("actions")  # the last journal.RECENT, oldest first
    context = property(lambda self: self.remedy_ctx.context)
    lr = property(lambda self: self.remedy_ctx.lr)
    snapshots = property(lambda self: self.remedy_ctx.snapshots)
    best = property(lambda self: self.remedy_ctx.best)
    skip = property(lambda self: self.guard.skip)
    clip = property(lambda self: self.guard.clip)
    ranges = property(lambda self: self.summary_ranges.ranges)
    passing = property(lambda self: self.cadence.passing)
    hooks_attached = property(lambda self: self.probes is not None and self.probes.hooks_attached)
    scheduled = property(lambda self: self.cadence.scheduled)  # step -> bool, asked once a step
    probing = property(lambda self: self.cadence.probing)

    def unit_activity(self, module: str | None) -> torch.Tensor | None:  # device vector, for remedies
        return self.probes.unit_activity(module) if self.probes is not None else None

    def bind(
        self,
        model: nn.Module,
        sinks: list[Sink],
        meta: dict[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        """Attach to ``model`` and open ``sinks`` for a run; ``context``: what remedies act on (none: they
        cannot). ``meta`` goes to the sinks: ``events_path``, ``setup``, ``log_every_n_steps``, ``run``."""
        meta = meta or {}
        self.unbind()
        self.remedy_ctx.context = context
        self.events_path = meta.get("events_path") or self.events_path
        self.setup = dict(meta.get("setup") or {})
        if not self._resumed:  # a new run: nothing of an earlier fit's state may be restored into it
            state.fresh(self)
        self._resumed = False
        self.guard.bind(model)
        if context is not None:
            self.lr.attach(context.optimizers(), context.schedulers())
        self.probes = ProbeSet(model, self.activations, self.inputs, context and context.optimizers)
        self.sinks = SinkSet(sinks)
        names = {**self.probes.names(self.config.per_layer), "every_step": self.config.every_step}
        self.sinks.start({**names, **meta})

    def unbind(self) -> None:
        """Remove every hook and drop per-run device state. Safe to call more than once."""
        self.lr.detach()
        self.guard.unbind(self.recorder.open, self.context.optimizers() if self.context else [])
        if self.probes is not None:
            self.probes.remove()
        self.recorder.clear()
        self.cadence.reset()

    def close(self) -> None:  # the end of a fit, validate or test: a loaded state was for that one
        self.unbind()
        self.sinks.close()
        self._resumed = self._snapshot_at_start = False

    def pass_over(self, step: int, epoch: int) -> bool:
        """Whether optimizer step ``step`` goes unmeasured (``measure="scheduled"``, not a scheduled step).
        Adapters ask once per optimizer, and call :meth:`before_optimizer_step` only when it says no."""
        return self.cadence.pass_over(step, epoch, recording=self.recorder.open is not None)

    def batch_start(self, step: int, batch: Any) -> None:
        """Before the forward: keep the buffers for skip_step; on a probe step, start the heavy probes."""
        if self._snapshot_at_start:  # checkpoint and optimizer state are restored by the first batch
            self._snapshot_at_start = False
            self.responder.snapshot(step, self.detectors)
        if not self.config.every_step:
            if self.cadence.start_batch(step):
                return  # measure="scheduled": nothing to prepare between the scheduled steps
        elif self.remedy_ctx.context is not None and not self.recorder.losses and self.recorder.open is None:
            self.guard.batch_start()  # the first batch of an optimizer step
        if self.probes is not None and self.cadence.scheduled(step):  # the heavy probes on probe steps
            self.probes.start(step, batch, self.cadence.probing(step), self.setup.get("epochs_counted", True))

    def before_optimizer_step(
        self,
        step: int,
        epoch: int,
        params: list[torch.Tensor],
        lr: float | None,
        *,
        loss_scale: torch.Tensor | None = None,
        grads_scaled: bool = False,
    ) -> None:
        """Gradients are final (accumulated, unscaled, not yet clipped): measure them on device, and let
        per-step protection act. ``loss_scale``: a GradScaler's scale tensor; ``grads_scaled``: the
        gradients still carry it (an optimizer that unscales inside ``step``)."""
        if self.probes is None:
            return
        first_call = self.recorder.open is None
        row = self.recorder.start(step, epoch, lr, loss_scale)  # a second optimizer joins the first's step
        if first_call and self.config.update_ratio and self.cadence.probing(step):
            self.probes.weights.snapshot()
        scale = loss_scale if grads_scaled else None
        measured = self.probes.measure_grads(params, self.cadence.scheduled(row.step), scale)
        if measured is None:
            return
        norms, positions, layers, grads = measured
        if self.remedy_ctx.context is not None and self.guard.active:
            self.guard.repair(row, params, grads, norms, loss_scale is not None, self.remedy_ctx.context)
        self.recorder.add_grads(norms, positions, layers)  # derived at the read, for all steps at once

    def batch_end(
        self, loss: torch.Tensor | None, *, loss_scale: torch.Tensor | None = None
    ) -> list[Finding]:
        """After the batch: add its loss; if an optimizer step ran, record it, and read on a scheduled step.
        ``loss_scale``: the GradScaler's scale after the step (lower than before: it skipped the step)."""
        if self.cadence.passing:  # measure="scheduled", a step between the scheduled ones: nothing is kept
            passed = self.cadence.end_passed()
            if passed is not None:  # its optimizer step ran: the step ends here (the summary counts it)
                self.last_step, self.last_epoch = passed
                self.recorder.losses = []
            return []
        if self.probes is not None:
            self.probes.end()
        if loss is not None:
            self.recorder.add_loss(loss)
        row = self.recorder.close(loss_scale)
        if row is None:
            return []  # accumulating: no optimizer step in this batch
        self.guard.step_done(row, self.remedy_ctx.context.optimizers() if self.remedy_ctx.context else [])
        if self.cadence.scheduled(row.step) or self.recorder.full or self.guard.pending:
            return self.flush()
        return []

    def validation_end(self, step: int, val_loss: float | None) -> None:
        """Validation after optimizer step ``step`` (the same value on every rank: the adapter reduces it):
        kept for the best weights and, when early stopping is on, judged at once (with what is pending,
        or on its own), else at the next read."""
        if val_loss is None:
            return
        self.pending_val_loss = val_loss
        self.judge.new_validation()
        self.sinks.validation(step, val_loss)
        if not self.responder.validation_rules():
            return
        if math.isfinite(val_loss):
            self.best.offer(step, val_loss, self.remedy_ctx.context.model)
        if self.recorder.rows:
            self.flush()
            return
        new = self.judge.validation(step, self.last_epoch, val_loss)  # just after a read: on its own
        self._publish(new)
        if new:  # a finding makes its step notable: the rows the last read kept back are written now
            self.sinks.close_curves()
        self.responder.respond(new)

    def flush(
        self, *, across_ranks: bool = True, respond: bool = True, escalate: bool = True
    ) -> list[Finding]:
        """Read everything pending in one transfer (all-reduced once under DDP, unless ``across_ranks`` is
        off: a failing rank reads alone), judge, respond, write. ``respond=False`` (a checkpoint is being
        written) defers the remedies to the next read; ``escalate=False`` (the run's end) logs device skips
        without escalating them."""
        if not self.recorder.rows:
            return []
        rows, grad_layers = self.recorder.take()
        val_loss, self.pending_val_loss = self.pending_val_loss, None
        last = rows[-1]
        clipping, scheduled = self.guard.clip is not None, self.cadence.scheduled(last.step)
        out = read(rows, grad_layers, self.probes, scheduled, clipping, val_loss, across_ranks)
        stats = self.last_stats = out.stats
        self.steps_seen += len(rows)
        self.last_step, self.last_epoch = last.step, last.epoch
        new = self.judge.read(stats)
        self._publish(new)  # before an escalation's own finding, which comes from a step after them
        restored, step_actions = self.guard.settle(rows, stats, out.clips, respond and escalate, respond)
        self.summary_ranges.track(stats)
        self.sinks.read(stats, {x.step for x in [*new, *step_actions]} | self.guard.clipped_steps)
        for action in step_actions:
            self.record_action(action)
        if respond:
            deferred, self.deferred = self.deferred, []
            self.responder.respond(deferred + new, restored=restored)
            self.responder.after_read(last.step, new, self.detectors, stats)
        else:
            self.deferred.extend(new)
        return new

    def _publish(self, findings: list[Finding]) -> None:
        for finding in findings:
            self.journal.add_finding(finding)
            self.sinks.finding(finding)

    def _history(self) -> list[Action]:  # what a give-up says was tried (a method: copies stay apart)
        return self.journal.history() + self.guard.pending

    def record_action(self, action: Action) -> None:
        self.journal.add_action(action)
        self.sinks.action(action)

    def finish(self, status: str = "finished") -> dict[str, Any]:
        """Flush what is pending, write the summary, remove hooks. Returns the summary dict."""
        try:
            # skips decided on device are logged, not escalated: the run is over, and its weights were
            # never touched by them, so rolling back now would only throw training away
            self.flush(across_ranks=status == "finished", escalate=False)
            self.sinks.close_curves()  # the last read and the run's last step close the curves
        except Exception as err:  # a failed run (a CUDA error, say) may not give its tensors back
            log.warning("gradwatch: could not read the last %s step(s) back after a failure: %s", status, err)
        self.unbind()
        summary = run_summary(self, status)
        self.sinks.summary(summary)
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes over a run (:mod:`gradwatch.state`). Pending rows are read and judged
        first; remedies wait for the next read (the checkpoint's weights were captured already)."""
        self.flush(respond=False)
        return state.save(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state.load(self, saved)
        self._resumed = self._snapshot_at_start = True
