"""The Lightning-free core: the wiring of probes -> recorder -> one read -> detectors -> remedies -> sinks.

``Monitor`` knows nothing of a trainer. An adapter (the Lightning callback, or ``Watch``) calls:

- :meth:`Monitor.bind` once a model exists, :meth:`Monitor.unbind` when the run ends (or fails);
- :meth:`Monitor.batch_start` before each training batch's forward;
- :meth:`Monitor.pass_over` first, then (unless it says the step is passed over)
  :meth:`Monitor.before_optimizer_step` with the optimizer about to step (gradients final);
- :meth:`Monitor.batch_end` after the batch (and its optimizer step, if any);
- :meth:`Monitor.validation_end` with the validation loss;
- :meth:`Monitor.finish` at the end, which flushes and writes the summary.

Per step, gradwatch keeps a handful of device tensors (the recorder's row) and never reads them: they are
read back, with the scheduled step's per-layer statistics, in one stacked transfer when the schedule says so.
Each part has one owner: options (``config.py``), which steps (``cadence.py``), the per-step record
(``recorder.py``), the read (``read.py``), the rules (``detectors/``), the ladder (``remedies/responder.py``),
per-step protection (``remedies/guard.py``), the snapshot policy (``remedies/snapshots.py``), the sinks
(``sinks/fanout.py``), checkpoint state (``state.py``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from gradwatch import state
from gradwatch.cadence import Cadence
from gradwatch.config import Config
from gradwatch.findings import Action, Finding
from gradwatch.probes import ActivationProbe, GradientProbe, ParamLayout, WeightProbe, input_stats
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
from gradwatch.sinks import Sink, build_summary
from gradwatch.sinks.fanout import SinkSet
from gradwatch.sinks.summary import Ranges
from gradwatch.stats import Stats, Transfer

log = logging.getLogger("gradwatch")

#: With the default ``snapshot_every=None``: the most of the training time rollback snapshots may take.
AUTO_SNAPSHOT_OVERHEAD = 0.0025


class Monitor:
    """Training-health monitor core. Takes the options of :class:`gradwatch.config.Config` (or one)."""

    def __init__(self, config: Config | None = None, /, **options: Any) -> None:
        self.config = config if config is not None else Config.build("Monitor", options)
        cfg = self.config
        self.remedies = cfg.remedy_list
        self.detectors = cfg.detector_list
        self.cadence = Cadence(cfg.schedule, cfg.every_step, cfg.probe_every_n_steps)
        self.events_path = cfg.events_file
        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        #: The statistics of the latest host read (what the detectors last judged).
        self.last_stats: Stats | None = None
        self.sinks = SinkSet()
        self.steps_seen, self.last_step, self.last_epoch = 0, -1, 0
        self.summary_ranges = Ranges()
        #: The training setup (precision, scaler, accumulation, ...), written in the summary under "setup".
        self.setup: dict[str, Any] = {}
        self.remedy_ctx = RemedyContext(
            lr=LRControl(),
            snapshots=Snapshots(
                keep=cfg.snapshots,
                every_n_steps=cfg.snapshot_every or 20,
                max_overhead=AUTO_SNAPSHOT_OVERHEAD if cfg.snapshot_every is None else None,
            ),
            best=BestWeights(),
            activity=self.unit_activity,
        )
        self.responder = Responder(
            self.remedies, self.remedy_ctx, self._publish, self.record_action, self._history
        )
        self.guard = StepGuard(self.remedies, self.responder, MAX_PENDING_ROWS)
        self.remedy_ctx.skipping = self.guard.skip is not None
        self.recorder = Recorder()
        self._layout: ParamLayout | None = None
        self._grads: GradientProbe | None = None
        self._weights: WeightProbe | None = None
        self._acts: ActivationProbe | None = None
        self._transfer = Transfer()  # what the probes queued for the next read
        self._act_names: tuple[list[str], list[str]] | None = None
        self._probed_step: int | None = None
        self._val_loss: float | None = None
        self._val_judged = False  # the validation rules judged _val_loss already (_judge_validation)
        self._resumed = False
        self.deferred: list[Finding] = []  # judged while a checkpoint was written: answered at the next read

    # ------------------------------------------------------------------ public views
    schedule = property(lambda self: self.config.schedule)
    every_n_steps = property(lambda self: self.config.every_n_steps)
    every_step = property(lambda self: self.config.every_step)
    remedy_mode = property(lambda self: self.config.remedy_mode)
    context = property(lambda self: self.remedy_ctx.context)
    lr = property(lambda self: self.remedy_ctx.lr)
    snapshots = property(lambda self: self.remedy_ctx.snapshots)
    best = property(lambda self: self.remedy_ctx.best)
    skip = property(lambda self: self.guard.skip)
    clip = property(lambda self: self.guard.clip)
    ranges = property(lambda self: self.summary_ranges.ranges)
    passing = property(lambda self: self.cadence.passing)
    hooks_attached = property(lambda self: self._acts is not None and self._acts.attached)

    def scheduled(self, step: int) -> bool:
        return self.cadence.scheduled(step)

    def probing(self, step: int) -> bool:
        return self.cadence.probing(step)

    def unit_activity(self, module: str | None) -> torch.Tensor | None:
        """Per-unit activity of ``module`` at the last sampled step (device vector), for remedies."""
        return self._acts.activity.get(module) if self._acts is not None and module else None

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        model: nn.Module,
        sinks: list[Sink],
        meta: dict[str, Any] | None = None,
        context: Context | None = None,
        *,
        events_path: str | None = None,
        setup: dict[str, Any] | None = None,
    ) -> None:
        """Attach to ``model`` and open ``sinks`` for a run. ``context`` hands remedies the training
        objects; without it remedies cannot act. ``events_path``: where the adapter put the events file
        (for the summary); ``setup``: the training setup (gradwatch.setups)."""
        self.unbind()
        self.remedy_ctx.context = context
        if events_path is not None:
            self.events_path = events_path
        self.setup = dict(setup or {})
        if not self._resumed:  # a new run: nothing of an earlier fit's state may be restored into it
            self.snapshots.ring.clear()
            self.remedy_ctx.best = BestWeights()
            for part in [*self.remedies, *self.detectors]:  # baselines of another run would misjudge it
                part.new_run()
        self._resumed = False
        self.guard.bind(model)
        if context is not None:
            self.lr.attach(context.optimizers(), context.schedulers())
        self._layout = ParamLayout(model)
        self._grads = GradientProbe(self._layout)
        self._weights = WeightProbe(self._layout)
        self._acts = ActivationProbe(model) if self.config.activations else None
        self.sinks = SinkSet(sinks)
        # What sinks may lay out by name (TensorBoard's per-block charts); per-layer tags need per_layer.
        names = {"layers": list(self._layout.layers), "per_layer": self.config.per_layer}
        names["modules"] = [n for n, _, _ in self._acts.modules] if self._acts is not None else []
        self.sinks.start({**names, **(meta or {})})

    def unbind(self) -> None:
        """Remove every hook and drop per-run device state. Safe to call more than once."""
        self.lr.detach()
        self.guard.unbind(self.recorder.open, self.context.optimizers() if self.context else [])
        if self._acts is not None:
            self._acts.remove()
        if self._weights is not None:
            self._weights.discard()
        self.recorder.clear()
        self.cadence.reset()
        self._transfer, self._act_names, self._probed_step = Transfer(), None, None

    def close(self) -> None:
        self.unbind()
        self.sinks.close()

    # ------------------------------------------------------------------ per step
    def pass_over(self, step: int, epoch: int) -> bool:
        """With ``measure="scheduled"``: whether optimizer step ``step`` goes unmeasured (not a scheduled
        step); if so nothing of it is kept. Always ``False`` with ``measure="every_step"``. Adapters ask once
        per optimizer, and call :meth:`before_optimizer_step` only when it says ``False``."""
        return self.cadence.pass_over(step, epoch, recording=self.recorder.open is not None)

    def batch_start(self, step: int, batch: Any) -> None:
        """Before the forward: keep the buffers for skip_step; on a probe step's first batch, attach
        activation hooks and read inputs."""
        if not self.every_step:
            if self.cadence.start_batch(step):
                return  # measure="scheduled": nothing to prepare between the scheduled steps
        elif self.context is not None and not self.recorder.losses and self.recorder.open is None:
            self.guard.batch_start()  # the first batch of an optimizer step
        if not self.probing(step) or self._probed_step == step:
            return
        self._probed_step = step
        if self._acts is not None:
            self._acts.attach()
        stats = input_stats(batch) if self.config.inputs else None
        if stats is not None:
            self._transfer.add("inputs", stats)

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
        """Gradients are final (accumulated, unscaled, not yet clipped): measure them on device.

        ``loss_scale`` is the AMP GradScaler's scale tensor, if any; ``grads_scaled`` says the gradients are
        still multiplied by it (an optimizer that unscales inside ``step``), so norms are divided by it.
        """
        if self._grads is None:
            return
        first_call = self.recorder.open is None
        row = self.recorder.start(step, epoch, lr, loss_scale)  # a second optimizer joins the first's step
        measured = self._grads.measure_raw(params, per_layer=self.scheduled(row.step))
        if first_call and self.config.update_ratio and self.probing(step):
            self._weights.snapshot()
        if measured is None:
            return
        norms, positions, layers, grads = measured
        if grads_scaled and loss_scale is not None:  # still scaled: ||g / s|| = ||g|| * (1/s)
            inv = loss_scale.detach().float().reciprocal()
            norms = norms * inv
            layers = layers * inv.square() if layers is not None else None
        if self.context is not None and self.guard.active:
            self.guard.repair(row, params, grads, norms, loss_scale is not None, self.context)
        self.recorder.add_grads(norms, positions, layers)  # derived at the read, for all steps at once

    def batch_end(
        self, loss: torch.Tensor | None, *, loss_scale: torch.Tensor | None = None
    ) -> list[Finding]:
        """After the batch: add its loss; if an optimizer step ran, record it, and read on a scheduled step.

        ``loss_scale`` is the GradScaler's scale tensor after the step: lower than before means the scaler
        found an Inf/NaN gradient and skipped the step (compared on device, no read).
        """
        if self.passing:  # measure="scheduled", a step between the scheduled ones: nothing is kept
            passed = self.cadence.end_passed()
            if passed is not None:  # its optimizer step ran: the step ends here (the summary counts it)
                self.last_step, self.last_epoch = passed
                self.recorder.losses = []
            return []
        if self._acts is not None and self._acts.attached:
            self._acts.detach()
            names, kinds, acts = self._acts.collect()
            if acts is not None:
                self._transfer.add("activations", acts)
                self._act_names = (names, kinds)
        if loss is not None:
            self.recorder.add_loss(loss)
        row = self.recorder.close(loss_scale)
        if row is None:
            return []  # accumulating: no optimizer step in this batch
        self.guard.step_done(row, self.context.optimizers() if self.context else [])
        if self.scheduled(row.step) or self.recorder.full or self.guard.pending:
            return self.flush()
        return []

    def validation_end(self, step: int, val_loss: float | None) -> None:
        """Validation after optimizer step ``step``: kept for the best weights, and judged at once when
        early stopping can act on it (a read of what is pending, or the validation alone when nothing is
        pending), else at the next read. On every rank alike: the adapter reduces the value."""
        if val_loss is None:
            return
        self._val_loss, self._val_judged = val_loss, False
        self.sinks.scalars(step, {"gradwatch/loss/val": val_loss})
        if self.responder.validation_rules:
            if math.isfinite(val_loss):
                self.best.offer(step, val_loss, self.context.model)
            if self.recorder.rows:
                self.flush()
            else:  # just after a read (always, with measure="scheduled"): the validation on its own
                self._judge_validation(step)

    def _judge_validation(self, step: int) -> None:
        """Run the validation rules on this validation alone (no step rows), and respond. The other rules
        still see the validation at the next read; these ones are not shown it twice."""
        stats = Stats(step=step, epoch=self.last_epoch, steps=[], val_loss=self._val_loss)
        self._val_judged = True
        rules = self.responder.validation_rules
        new = [f for d in self.detectors if d.rule in rules for f in d.check(stats.step, stats)]
        self._publish(new)
        if new:  # a finding makes its step notable: the rows the last read kept back are written now
            self.sinks.close_curves()
        self.responder.respond(new)

    # ------------------------------------------------------------------ read, judge, act, write
    def flush(
        self, *, across_ranks: bool = True, respond: bool = True, escalate: bool = True
    ) -> list[Finding]:
        """Read everything pending in one transfer, run the detectors and remedies, write to the sinks.

        Under ``torch.distributed`` the transfer is all-reduced once (``across_ranks``; a failing rank
        reads alone so that it cannot wait forever on the others). ``respond=False`` (a checkpoint is being
        written) defers the remedies to the next read; ``escalate=False`` (the end of the run) logs skips
        decided on device without escalating them.
        """
        if not self.recorder.rows:
            return []
        rows, grad_layers = self.recorder.take()
        transfer, self._transfer = self._transfer, Transfer()
        names, self._act_names = self._act_names, None
        val_loss, self._val_loss = self._val_loss, None
        last = rows[-1]
        out = read(
            rows,
            transfer,
            self._layout,
            grad_layers=grad_layers,
            weights=self._weights if self.scheduled(last.step) else None,
            clipping=self.guard.clip is not None,
            activation_names=names,
            val_loss=val_loss,
            across_ranks=across_ranks,
        )
        stats = self.last_stats = out.stats
        self.steps_seen += len(rows)
        self.last_step, self.last_epoch = last.step, last.epoch
        new = self._judge(stats)
        self._publish(new)  # before an escalation's own finding, which comes from a step after them
        restored = self.guard.tally(rows, stats, escalate=respond and escalate)
        step_actions = self.guard.take_actions()
        clipped = self.guard.clipped(rows, stats, out.clips)
        notable = {x.step for x in [*new, *step_actions]} | {c[0] for c in clipped}
        self.summary_ranges.track(stats)
        self.sinks.read(stats, notable)
        for action in [*step_actions, self.guard.clip_action(clipped)]:
            if action is not None:
                self.record_action(action)
        if respond:
            deferred, self.deferred = self.deferred, []
            self.responder.respond(deferred + new, restored=restored)
            self.responder.after_read(last.step, new, self.detectors, stats)
        else:
            self.deferred.extend(new)
        return new

    def _judge(self, stats: Stats) -> list[Finding]:
        """Every rule on this read; a validation judged at once already is not shown to its rules again."""
        judged, self._val_judged = self._val_judged, False
        rules = self.responder.validation_rules
        seen = replace(stats, val_loss=None) if judged else stats
        return [f for d in self.detectors for f in d.check(stats.step, seen if d.rule in rules else stats)]

    def _publish(self, findings: list[Finding]) -> None:
        for finding in findings:
            self.findings.append(finding)
            self.sinks.finding(finding)

    def record_action(self, action: Action) -> None:
        self.actions.append(action)
        self.sinks.action(action)

    def _history(self) -> list[Action]:
        return self.actions + self.guard.pending

    # ------------------------------------------------------------------ end of run
    def finish(self, status: str = "finished") -> dict[str, Any]:
        """Flush what is pending, write the summary, remove hooks. Returns the summary dict."""
        try:
            # skips decided on device are logged, not escalated: the run is over, and its weights were
            # never touched by them, so rolling back now would only throw training away
            self.flush(across_ranks=status == "finished", escalate=False)
            self.sinks.close_curves()  # the last read and the run's last step close the curves
        except Exception as err:  # a failed run (a CUDA error, say) may not give its tensors back
            self.recorder.clear()
            log.warning(
                "gradwatch: could not read the last %s step(s) back after the failure: %s", status, err
            )
        self.unbind()
        summary = build_summary(
            self.findings,
            self.actions,
            status=status,
            steps=self.last_step + 1,
            epochs=self.last_epoch + 1,
            remedies=[r.name for r in self.remedies],
            ranges=self.ranges,
            events_path=self.events_path,
        )
        summary["memory"] = {
            "snapshot_mib": round(self.snapshots.peak_bytes / 2**20, 3),
            "snapshots_kept": len(self.snapshots.ring),
            "best_weights_mib": round(self.best.nbytes / 2**20, 3),
        }
        if self.lr.multiplier != 1.0:
            summary["lr_multiplier"] = self.lr.multiplier
        summary["setup"] = dict(self.setup)
        self.sinks.summary(summary)
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes over a run, for checkpoints (see :mod:`gradwatch.state`).

        Pending device rows are read and judged first, but remedies wait for the next regular read: a
        checkpoint is being written, and its weights were captured before this call.
        """
        self.flush(respond=False)
        return state.save(self)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        state.load(self, saved)
        self._resumed = True
