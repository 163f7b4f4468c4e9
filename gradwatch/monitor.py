"""The Lightning-free core: probes -> one host read -> detectors -> remedies -> sinks.

``Monitor`` knows nothing of a trainer. An adapter (the Lightning callback, or a plain loop) calls:

- :meth:`Monitor.bind` once a model exists, :meth:`Monitor.unbind` when the run ends (or fails);
- :meth:`Monitor.batch_start` before each training batch's forward;
- :meth:`Monitor.pass_over` first, then (unless it says the step is passed over)
  :meth:`Monitor.before_optimizer_step` with the optimizer about to step (gradients final);
- :meth:`Monitor.batch_end` after the batch (and its optimizer step, if any);
- :meth:`Monitor.validation_end` with the validation loss;
- :meth:`Monitor.finish` at the end, which flushes and writes the summary.

Per step, gradwatch keeps a handful of device scalars (loss, total gradient norm, non-finite count,
first non-finite parameter) and never reads them: they are read back, with the scheduled step's
per-layer statistics, in one stacked transfer when the schedule says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from gradwatch.detectors import Detector, default_detectors
from gradwatch.distributed import MEAN, SUM
from gradwatch.errors import ConfigError, check_positive_int, did_you_mean
from gradwatch.findings import Action, Finding
from gradwatch.probes import ActivationProbe, GradientProbe, ParamLayout, WeightProbe, input_stats
from gradwatch.probes.activations import FIELDS
from gradwatch.probes.gradients import nonfinite_summary, squared_total
from gradwatch.remedies import (
    LADDER,
    BestWeights,
    ClipGradients,
    Context,
    EarlyStop,
    LRControl,
    Remedy,
    Rollback,
    SkipStep,
    Snapshots,
    resolve_remedies,
)
from gradwatch.schedules import Schedule, as_schedule
from gradwatch.setups import needs_automatic_loop_message
from gradwatch.sinks import Sink, build_summary
from gradwatch.stats import ActivationStats, InputStats, Stats, StepRecord, Transfer

STATE_VERSION = 1

log = logging.getLogger("gradwatch")

#: Rules that mean the run is unstable: no rollback snapshot is taken while one is open.
UNSTABLE = ("nonfinite", "gradient_spike", "loss_spike", "exploding_gradients", "divergence")

#: Rules whose findings a rollback makes moot: they describe the state it just discarded.
ROLLED_BACK_PAST = ("exploding_gradients", "divergence", "update_ratio", "gradient_spike", "loss_spike")

#: Rows kept on device before a flush is forced, whatever the schedule says.
MAX_PENDING_ROWS = 1024

#: The heavy probes run at every read during a run's first steps (initialization faults show there),
#: then every ``probe_every_n_steps``.
DENSE_PROBE_STEPS = 200

#: With the default ``snapshot_every=None``: the most of the training time rollback snapshots may take.
AUTO_SNAPSHOT_OVERHEAD = 0.0025

#: ``measure=``: every optimizer step, or only the scheduled ones (see :class:`Monitor`).
MEASURE_MODES = ("every_step", "scheduled")

#: What looks at every step, and so cannot run with ``measure="scheduled"``.
PER_STEP_REMEDIES = ("skip_step", "clip_gradients")

#: The per-step row, as sufficient statistics that add up across ranks (see gradwatch.distributed):
#: first_x_bad is the first non-finite index where bad is 1, else 0; skipped is the GradScaler's skip flag.
ROW_FIELDS = ("loss", "grad_sq", "nonfinite", "first_x_bad", "bad", "loss_scale", "skipped")


@dataclass
class _PendingRow:
    """An optimizer step recorded on device, waiting for the next host read."""

    step: int
    epoch: int
    lr: float | None
    values: torch.Tensor | None  # ROW_FIELDS on device, once derived (at the read)
    has_loss: bool
    norms: list[torch.Tensor] = field(default_factory=list)  # one vector per optimizer stepped
    positions: list[torch.Tensor] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)  # one per (micro-)batch
    scale: torch.Tensor | None = None  # GradScaler: the scale after the step, and whether it skipped
    skipped: torch.Tensor | None = None
    device_skip: bool = (
        False  # skip_step decided on device (a fused optimizer's found_inf): tallied at the read
    )


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


class Monitor:
    """Training-health monitor core. See :class:`gradwatch.HealthMonitor` for the arguments."""

    def __init__(
        self,
        *,
        remedies: str | list[str | Remedy] = "auto",
        every_n_steps: int | Schedule = 20,
        probe_every_n_steps: int | None = 100,
        alert_url: str | None = None,
        events_path: str | os.PathLike[str] | None = None,
        per_layer: bool = False,
        activations: bool = True,
        inputs: bool = True,
        update_ratio: bool = True,
        detectors: Iterable[Detector] | None = None,
        print_summary: bool = True,
        snapshot_every: int | None = None,
        snapshots: int = 2,
        measure: str = "every_step",
    ) -> None:
        self.schedule: Schedule = as_schedule("every_n_steps", every_n_steps, 20)
        self.every_n_steps = every_n_steps
        if measure not in MEASURE_MODES:
            raise ConfigError(
                f"measure must be 'every_step' or 'scheduled', got {measure!r}."
                f'{did_you_mean(str(measure), MEASURE_MODES)} Write measure="every_step" (the default: every '
                'step\'s loss and gradient norm) or measure="scheduled" (only the every_n_steps steps).'
            )
        self.measure = measure
        #: False with ``measure="scheduled"``: steps between scheduled ones are passed over, not measured.
        self.every_step = measure == "every_step"
        self.probe_every_n_steps = (
            None
            if probe_every_n_steps is None
            else check_positive_int("probe_every_n_steps", probe_every_n_steps, 100)
        )
        self.remedy_mode = remedies if isinstance(remedies, str) else "custom"
        self.remedies: list[Remedy] = resolve_remedies(remedies)
        if not self.every_step:
            if remedies == "auto":  # "auto": every remedy that can act on what is measured
                self.remedies = [r for r in self.remedies if r.name not in PER_STEP_REMEDIES]
            per_step = [r.name for r in self.remedies if r.name in PER_STEP_REMEDIES]
            if per_step:
                kept = [r.name for r in self.remedies if r.name not in PER_STEP_REMEDIES]
                raise ConfigError(
                    f'remedies {per_step} act on every optimizer step, and measure="scheduled" looks at one '
                    f'step in every_n_steps. Write remedies={kept!r} (or "auto", which leaves them out '
                    'here), or measure="every_step" to keep them.'
                )
        if alert_url is not None and (
            not isinstance(alert_url, str) or not alert_url.startswith(("http://", "https://"))
        ):
            raise ConfigError(
                f"alert_url must be an http(s) URL string or None, got {alert_url!r}. "
                'Write e.g. alert_url="https://hooks.slack.com/services/...".'
            )
        self.alert_url = alert_url
        if events_path is not None and not isinstance(events_path, str | os.PathLike):
            raise ConfigError(
                f"events_path must be a path (str or os.PathLike) or None, got {events_path!r} "
                f'({type(events_path).__name__}). Write e.g. events_path="runs/events.jsonl", or leave it '
                "out for <trainer.log_dir>/gradwatch/events.jsonl."
            )
        self.events_path = os.fspath(events_path) if events_path is not None else None
        self.per_layer = _check_bool("per_layer", per_layer)
        #: Per-step TensorBoard rows are written every this many steps (and at every notable step); the
        #: Lightning adapters set it from ``Trainer(log_every_n_steps=...)``.
        self.log_every_n_steps = 50
        self.probe_activations = _check_bool("activations", activations)
        self.probe_inputs = _check_bool("inputs", inputs)
        self.probe_update_ratio = _check_bool("update_ratio", update_ratio)
        self.print_summary = _check_bool("print_summary", print_summary)
        if detectors is None:
            self.detectors = default_detectors()
        else:
            self.detectors = list(detectors)
            for d in self.detectors:
                if not isinstance(d, Detector):
                    raise ConfigError(
                        f"detectors must be Detector instances, got {d!r} ({type(d).__name__}). "
                        "Write e.g. detectors=[gradwatch.detectors.NonFinite()] or leave it out for all rules."
                    )

        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        #: The statistics of the latest host read (what the detectors last judged).
        self.last_stats: Stats | None = None
        self.sinks: list[Sink] = []
        self.steps_seen = 0
        self.last_step = -1
        self.last_epoch = 0
        self.ranges: dict[str, dict[str, float]] = {}

        self._layout: ParamLayout | None = None
        self._grads: GradientProbe | None = None
        self._weights: WeightProbe | None = None
        self._acts: ActivationProbe | None = None
        self._rows: list[_PendingRow] = []
        self._row: dict[str, Any] | None = None
        self._losses: list[torch.Tensor] = []
        self._loss_n = 0
        self._probed_step: int | None = None
        #: measure="scheduled": True while a batch, or an optimizer step, is passed over (not measured),
        #: from :meth:`batch_start` (or :meth:`pass_over`) to the :meth:`batch_end` that ends its step.
        self.passing = False
        self._passed: tuple[int, int] | None = None  # (step, epoch) of the optimizer step passed over
        self._sched_memo: tuple[int, bool] = (-1, False)  # (step, the schedule's answer): asked once a step
        self._last_probe: int | None = None  # the last probe step (see probing)
        self._probe_memo: tuple[int, bool] = (-1, False)  # (step, decision): asked twice per step
        self._tail_row: StepRecord | None = None  # the last step's row, if not written yet
        self._tail_values: tuple[int, dict[str, float]] | None = None  # the last read's row, if not written
        self._read_row_due = True  # a logging-cadence step has passed since the read row was last written
        self._snap = Transfer()
        self._snap_meta: dict[str, Any] = {}
        self._val_loss: float | None = None
        self._val_judged = False  # early stopping's rules judged _val_loss already (_judge_validation)
        #: The training setup (precision, scaler, accumulation, strategy, ...): set by the adapter at fit
        #: start (gradwatch.setups.describe_setup), written in the summary under "setup".
        self.setup: dict[str, Any] = {}

        # remedies and the state they share
        self.context: Context | None = None
        self.lr = LRControl()
        self.snapshots = Snapshots(
            keep=check_positive_int("snapshots", snapshots, 2),
            # None: every 20 steps at most, and copying at most 0.25% of the time; a number: that cadence
            every_n_steps=20
            if snapshot_every is None
            else check_positive_int("snapshot_every", snapshot_every, 20),
            max_overhead=AUTO_SNAPSHOT_OVERHEAD if snapshot_every is None else None,
        )
        self.best = BestWeights()
        self.skip = self._remedy(SkipStep)
        self.clip = self._remedy(ClipGradients)
        self.rollback = self._remedy(Rollback)
        self.early_stop = self._remedy(EarlyStop)
        self._step_actions: list[Action] = []
        self._clips: list[torch.Tensor] = []
        self._warned_manual: set[str] = set()
        self._resumed = False
        self._deferred: list[Finding] = []

    def _remedy(self, cls: type) -> Any:
        return next((r for r in self.remedies if isinstance(r, cls)), None)

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        model: nn.Module,
        sinks: list[Sink],
        meta: dict[str, Any] | None = None,
        context: Context | None = None,
    ) -> None:
        """Attach to ``model`` (parameters, modules) and open ``sinks`` for a run.

        ``context`` hands remedies the training objects (optimizers, schedulers, scaler, a way to stop);
        without it remedies cannot act.
        """
        self.unbind()
        self.context = context
        if not self._resumed:  # a new run: nothing of an earlier fit's state may be restored into it
            self.snapshots.ring.clear()
            self.best = BestWeights()
            for remedy in self.remedies:
                remedy.new_run()
            for detector in self.detectors:  # baselines of another run would misjudge this one
                detector.new_run()
        self._resumed = False
        if self.skip is not None:
            self.skip.bind(model)
        if context is not None:
            self.lr.attach(context.optimizers(), context.schedulers())
        self._layout = ParamLayout(model)
        self._grads = GradientProbe(self._layout)
        self._weights = WeightProbe(self._layout)
        self._acts = ActivationProbe(model) if self.probe_activations else None
        self.sinks = list(sinks)
        # What sinks may lay out by name (TensorBoard's per-block charts); per-layer tags need per_layer.
        names = {"layers": list(self._layout.layers), "per_layer": self.per_layer}
        names["modules"] = [n for n, _, _ in self._acts.modules] if self._acts is not None else []
        for sink in self.sinks:
            sink.start({**names, **(meta or {})})

    def unbind(self) -> None:
        """Remove every hook and drop per-run device state. Safe to call more than once."""
        self.lr.detach()
        if self._row is not None and self._row.get("device_skip") and self.context is not None:
            for opt in self.context.optimizers():  # a step that raised must not leave its flag armed
                SkipStep.disarm(opt)
        if self.skip is not None:
            self.skip.remove_hooks()
        if self._acts is not None:
            self._acts.remove()
        if self._weights is not None:
            self._weights.discard()
        self._snap = Transfer()
        self._snap_meta = {}
        self._probed_step = None
        self._last_probe, self._probe_memo, self._tail_row = None, (-1, False), None
        self._tail_values, self._read_row_due = None, True
        self._row, self.passing, self._passed, self._sched_memo = None, False, None, (-1, False)
        self._rows, self._clips, self._step_actions = [], [], []
        self._losses, self._loss_n = [], 0

    def close(self) -> None:
        self.unbind()
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    @property
    def hooks_attached(self) -> bool:
        return self._acts is not None and self._acts.attached

    # ------------------------------------------------------------------ per step
    def scheduled(self, step: int) -> bool:
        """Whether ``step`` is a scheduled step. The schedule is asked once per step, so that every hook of
        a step sees the same answer, whatever the callable does when asked again."""
        memo_step, due = self._sched_memo
        if memo_step != step:
            due = bool(self.schedule(step))
            self._sched_memo = (step, due)
        return due

    def probing(self, step: int) -> bool:
        """Whether the heavy probes (activation hooks, input range, the weight copy for update ratios) run
        at ``step``: on every scheduled step of the first :data:`DENSE_PROBE_STEPS` steps, where
        initialization faults show, then on the first scheduled step at least ``probe_every_n_steps``
        after the last probe (every scheduled step with ``probe_every_n_steps=None``). A function of the
        steps seen in this fit alone, so every DDP rank decides alike."""
        memo_step, due = self._probe_memo
        if memo_step != step:
            every = self.probe_every_n_steps
            due = self.scheduled(step) and (
                every is None
                or step < DENSE_PROBE_STEPS
                or self._last_probe is None
                or step - self._last_probe >= every
            )
            if due:
                self._last_probe = step
            self._probe_memo = (step, due)
        return due

    def pass_over(self, step: int, epoch: int) -> bool:
        """With ``measure="scheduled"``: whether optimizer step ``step`` goes unmeasured (it is not a
        scheduled step); if so, nothing of it is kept until its :meth:`batch_end`. Always ``False`` with
        ``measure="every_step"``. Adapters ask once per optimizer, before collecting the step's
        parameters, and call :meth:`before_optimizer_step` only when it says ``False``."""
        if self.every_step or self._row is not None:
            return False
        if not self.passing and self.scheduled(step):
            return False
        self.passing = True
        if self._passed is None:  # not a second optimizer of the step: the step counted at its batch end
            self._passed = (step, epoch)
        return True

    def batch_start(self, step: int, batch: Any) -> None:
        """Before the forward: keep the buffers for skip_step; on a probe step's first batch, attach
        activation hooks and read inputs."""
        if not self.every_step:  # measure="scheduled": nothing to prepare between the scheduled steps
            self.passing = not self.scheduled(step)
            if self.passing:
                return
        elif self.context is not None:
            if self.skip is not None and self._loss_n == 0 and self._row is None:
                self.skip.save_buffers()  # the first batch of an optimizer step
        if not self.probing(step) or self._probed_step == step:
            return
        self._probed_step = step
        if self._acts is not None:
            self._acts.attach()
        if self.probe_inputs:
            stats = input_stats(batch)
            if stats is not None:
                self._snap.add("inputs", stats)

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
        first_call = self._row is None
        # a second optimizer in the same batch (manual optimization) belongs to the first one's step
        scheduled = self.scheduled(step if first_call else self._row["step"])
        measured = self._grads.measure_raw(params, per_layer=scheduled)
        if first_call:
            self._row = {"step": step, "epoch": epoch, "lr": lr}
            if loss_scale is not None:
                self._row["scale_before"] = loss_scale.detach().clone()  # update() changes it in place
            if self.probe_update_ratio and self._weights is not None and self.probing(step):
                self._weights.snapshot()
        if measured is None:
            return
        norms, positions, layers, grads = measured
        if grads_scaled and loss_scale is not None:  # still scaled: ||g / s|| = ||g|| * (1/s)
            inv = loss_scale.detach().float().reciprocal()
            norms = norms * inv
            layers = layers * inv.square() if layers is not None else None
        if self.context is not None and (self.skip is not None or self.clip is not None):
            self._repair_gradients(
                self._row["step"], epoch, params, grads, norms, scaled=loss_scale is not None
            )
        self._row.setdefault("norms", []).append(norms)  # derived at the read, for all steps at once
        self._row.setdefault("positions", []).append(positions)
        if layers is not None:
            prev = self._snap_meta.get("grad_layers")
            self._snap_meta["grad_layers"] = layers if prev is None else prev + layers

    def batch_end(
        self, loss: torch.Tensor | None, *, loss_scale: torch.Tensor | None = None
    ) -> list[Finding]:
        """After the batch: add its loss; if an optimizer step ran, record it, and read on a scheduled step.

        ``loss_scale`` is the GradScaler's scale tensor after the step: lower than before means the scaler
        found an Inf/NaN gradient and skipped the step (compared on device, no read).
        """
        if self.passing:  # measure="scheduled", a step between the scheduled ones: nothing is kept
            if self._passed is not None:  # its optimizer step ran: the step ends here
                self.last_step, self.last_epoch = self._passed  # the summary counts every step
                self.passing, self._passed = False, None
                self._losses, self._loss_n = [], 0
            return []  # else an earlier micro-batch of the step: still passing
        if self._acts is not None and self._acts.attached:
            self._acts.detach()
            names, kinds, acts = self._acts.collect()
            if acts is not None:
                self._snap.add("activations", acts)
                self._snap_meta["activation_names"] = (names, kinds)
        if loss is not None:
            self._losses.append(loss.detach())
            self._loss_n += 1
        if self._row is None:
            return []  # accumulating: no optimizer step in this batch
        row, self._row = self._row, None
        if row.get("device_skip") and self.context is not None:
            for opt in self.context.optimizers():  # the flag was for that one optimizer step
                SkipStep.disarm(opt)
        pending = _PendingRow(
            row["step"],
            row["epoch"],
            row["lr"],
            None,
            bool(self._losses),
            row.get("norms", []),
            row.get("positions", []),
            self._losses,
            device_skip=bool(row.get("device_skip")),
        )
        before = row.get("scale_before")
        if before is not None and loss_scale is not None:
            pending.scale = loss_scale.detach().float().reshape(()).clone()
            pending.skipped = (pending.scale < before.to(pending.scale.device)).float()
        self._rows.append(pending)
        if self.clip is not None:
            self._clips.append(row.get("clip", 1.0))  # a host float, or a device scalar (sync-free clipping)
        self._losses, self._loss_n = [], 0
        if self.scheduled(row["step"]) or len(self._rows) >= MAX_PENDING_ROWS or self._step_actions:
            return self.flush()
        return []

    def validation_end(self, step: int, val_loss: float | None) -> None:
        """Validation after optimizer step ``step``: kept for the best weights, and judged at once when
        early stopping can act on it (a read of what is pending, or the validation alone when nothing is
        pending), else at the next read. On every rank alike: the adapter reduces the value."""
        if val_loss is None:
            return
        self._val_loss, self._val_judged = val_loss, False
        self._emit_scalars(step, {"gradwatch/loss/val": val_loss})
        if self.early_stop is not None and self.context is not None:
            if math.isfinite(val_loss):
                self.best.offer(step, val_loss, self.context.model)
            if self._rows:
                self.flush()
            else:  # just after a read (always, with measure="scheduled"): the validation on its own
                self._judge_validation(step)

    def _judge_validation(self, step: int) -> None:
        """Run the rules early stopping answers on this validation alone (no step rows), and respond. The
        other rules still see the validation at the next read; these ones are not shown it twice."""
        stats = Stats(step=step, epoch=self.last_epoch, steps=[], val_loss=self._val_loss)
        self._val_judged = True
        new = [f for d in self.detectors if d.rule in EarlyStop.answers for f in d.check(stats.step, stats)]
        self._publish(new)
        if new:  # a finding makes its step notable: the rows the last read kept back are written now
            self._emit_tail()
        self._respond(new)

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
        if not self._rows:
            return []
        transfer = self._snap
        self._snap = Transfer()
        meta, self._snap_meta = self._snap_meta, {}
        rows, self._rows = self._rows, []
        values = self._derive(rows)
        # replicated parameters (DDP) hold the same averaged gradient on every rank: mean; shards add up
        shard = SUM if self._layout is not None and self._layout.sharded else MEAN
        modes = (MEAN, shard, shard, SUM, SUM, MEAN, SUM)  # per ROW_FIELDS
        transfer.add("rows", values, modes)
        if "grad_layers" in meta:
            transfer.add("grad_layers", meta["grad_layers"], shard)
        clips, self._clips = self._clips, []
        if len(clips) == len(rows) and clips:
            on_host = all(isinstance(c, float) for c in clips)
            coefs = (
                torch.tensor(clips, device=values.device)
                if on_host
                else torch.stack(
                    [torch.as_tensor(c, device=values.device).float().reshape(()) for c in clips]
                )
            )
            transfer.add("clips", coefs, MEAN)
        last = rows[-1]
        scheduled = self.scheduled(last.step) and self._layout is not None
        if scheduled:
            w_sq, w_bad, update = self._weights.measure()  # after the step: weights as updated
            transfer.add("weight_sq", w_sq, shard)
            transfer.add("weight_bad", w_bad, SUM)
            if update is not None:
                transfer.add("update", update, shard)
        host = transfer.read(across_ranks=across_ranks)
        stats = self._build_stats(rows, host, meta)
        self.last_stats = stats
        self.steps_seen += len(rows)
        self.last_step, self.last_epoch = last.step, last.epoch
        new: list[Finding] = []
        judged, self._val_judged = self._val_judged, False
        seen = replace(stats, val_loss=None) if judged else stats  # judged at once: not a second time
        for detector in self.detectors:
            new.extend(detector.check(stats.step, seen if detector.rule in EarlyStop.answers else stats))
        self._publish(new)  # before an escalation's own finding, which comes from a step after them
        restored = self.skip is not None and self._tally_device_skips(
            rows, stats, escalate=respond and escalate
        )
        step_actions, self._step_actions = self._step_actions, []
        clipped = []
        if "clips" in host and self.clip is not None:
            clipped = [
                (r.step, r.epoch, rec.grad_norm, float(c))
                for r, rec, c in zip(rows, stats.steps, host["clips"], strict=True)
                if c < 1.0
            ]
        notable = {x.step for x in [*new, *step_actions]} | {c[0] for c in clipped}
        self._write_scalars(stats, notable)
        for action in step_actions:
            self.record_action(action)
        if clipped:
            action = self.clip.clipped(clipped)
            if action is not None:
                self.record_action(action)
        if respond:
            deferred, self._deferred = self._deferred, []
            self._respond(deferred + new, restored=restored)
            self._maybe_snapshot(last.step, new)
        else:
            self._deferred.extend(new)
        return new

    def _publish(self, findings: list[Finding]) -> None:
        for finding in findings:
            self.findings.append(finding)
            for sink in self.sinks:
                sink.finding(finding)

    # ------------------------------------------------------------------ remedies
    def _repair_gradients(
        self,
        step: int,
        epoch: int,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        norms: torch.Tensor,
        scaled: bool,
    ) -> None:
        """Per-step remedies, before the optimizer steps: skip a non-finite step, clip adaptively.

        The sum of squares of the norms is non-finite exactly when a gradient holds a NaN or an Inf (or is
        so large that its square overflows, which is no step to take either). With ``skip_step`` on, that
        one number is read to the host (the per-step read), and clipping does its arithmetic on it too.
        """
        ctx = self.context
        if ctx is None:
            return
        sq_host: float | None = None
        opts = ctx.optimizers()
        if (
            self.skip is not None and not scaled and self.skip.ready(step)
        ):  # a GradScaler skips such steps itself
            if self._row is not None and self.skip.on_device(opts, ctx.world_size, MAX_PENDING_ROWS):
                # no read: the fused optimizer skips on the device flag; counted at the next read
                sq = torch.dot(norms, norms)
                self.skip.arm(opts[0], sq)
                self._row["device_skip"] = True
                if self.clip is not None and grads:
                    self._row["clip"] = self._clip(grads, norms, sq)
                return
            sq_host = squared_total(norms)  # sync: skip_step's decision, the one read per step (none on CPU)
            skip, norm, bad = self.skip.decide(step, sq_host, norms, ctx.reduce_any)
            if skip:
                for p in params:
                    p.grad = None  # torch optimizers leave parameters without a gradient untouched
                self.skip.restore_buffers()
                self._step_actions.append(self.skip.skipped(step, epoch, norm, bad))
                if self.skip.consecutive >= self.skip.max_consecutive:
                    self._escalate(step, epoch)
                return
        # one running norm per run: with several optimizers their norms would mix, so clipping stands aside
        if self.clip is not None and grads and self._row is not None and len(opts) == 1:
            self._row["clip"] = self._clip(grads, norms, sq_host)

    def _clip(
        self, grads: list[torch.Tensor], norms: torch.Tensor, sq: float | torch.Tensor | None
    ) -> float | torch.Tensor:
        """Adaptive clipping of this step, given its squared total norm if already computed. On the host
        (no tensor op unless it clips) when that number is on the host or the device is the CPU (where a
        read waits for nothing); else on the device, with no read. Returns the coefficient applied."""
        if isinstance(sq, float):
            return self.clip.clip_host(grads, sq)
        if norms.device.type == "cpu":
            return self.clip.clip_host(grads, squared_total(norms))
        return self.clip.clip(grads, sq if sq is not None else torch.dot(norms, norms))

    def _tally_device_skips(self, rows: list[_PendingRow], stats: Stats, escalate: bool) -> bool:
        """Steps whose skip was decided on device (a fused optimizer's ``found_inf``): now that their norms
        are on the host, count them, log each skip, and escalate at each skipped step that reaches
        ``max_consecutive``, as the per-step path does at that step (a rollback in its cooldown lets the
        skipping go on; a rollback resets the count). Not while a checkpoint is being written or the run
        ends (``escalate=False``): the count is kept, and a skip at the next read escalates. Returns
        whether a rollback restored a snapshot."""
        restored = False
        for r, rec in zip(rows, stats.steps, strict=True):
            if not r.device_skip:
                continue
            # the flag was "the total squared norm is not finite": the same test as the read's row
            skipped = rec.grad_nonfinite > 0 or not math.isfinite(rec.grad_norm)
            # after a rollback in this read, the later rows were computed with the weights it replaced:
            # they say nothing about the restored state, so they neither count nor escalate
            if not restored:
                self.skip.tally(r.step, skipped)
            if skipped:
                self._step_actions.append(
                    self.skip.skipped(r.step, r.epoch, rec.grad_norm, rec.grad_nonfinite)
                )
                if not restored and escalate and self.skip.consecutive >= self.skip.max_consecutive:
                    restored = self._escalate(r.step, r.epoch)
        return restored

    def _escalate(self, step: int, epoch: int) -> bool:
        """Skipping is not enough: roll back if possible, else (the ladder spent) stop and say why.
        Returns whether a snapshot was restored."""
        skipped = self.skip.consecutive
        finding = Rollback.escalation(step, epoch, skipped)
        if self.rollback is not None and not self.rollback.spent:
            if not self.rollback.ready(step):
                return False  # in its cooldown: keep skipping meanwhile
            action = self.rollback.restore(finding, self)
            if action is not None:
                self._publish([finding])
                self._step_actions.append(action)
                self.skip.consecutive = 0
                return True
        self._give_up(finding, self._step_actions.append)
        return False

    def _give_up(self, finding: Finding, record: Any) -> None:
        """The ladder for ``finding`` is spent: early_stop stops with a critical finding saying what was tried."""
        if self.early_stop is None or self.early_stop.stopped:
            return
        tried = [a for a in self.actions + self._step_actions if a.rule == finding.rule]
        out = self.early_stop.give_up(finding, tried, self)
        if out is not None:
            self._publish([out[0]])
            record(out[1])

    def _respond(self, findings: list[Finding], restored: bool = False) -> None:
        """Let the remedies answer new warning/critical findings, in ladder order; one action per finding.

        ``restored``: skips decided on device escalated to a rollback in this read, after its statistics
        were measured: the non-finite values they show (weights included) are in the discarded state.
        """
        if self.context is None:
            return
        rolled_back = restored
        moot = ROLLED_BACK_PAST + ("nonfinite",) if restored else ROLLED_BACK_PAST
        for finding in findings:
            if finding.severity == "info" or (rolled_back and finding.rule in moot):
                continue  # a rollback in this read already went back past what these findings saw
            order = LADDER.get(finding.rule, ())
            answering = sorted(
                (r for r in self.remedies if finding.rule in r.answers),
                key=lambda r: order.index(r.name) if r.name in order else len(order),
            )
            acted = False
            for remedy in answering:
                if remedy.needs_automatic_loop and not self.context.automatic:
                    self._warn_manual(remedy.name)
                    continue
                if not remedy.ready(finding.step):
                    continue
                action = remedy.respond(finding, self)
                if action is not None:
                    self.record_action(action)
                    acted = True
                    rolled_back = rolled_back or action.remedy == "rollback"
                    break
            spent = answering and all(r.spent for r in answering)
            if not acted and spent and finding.severity == "critical":
                self._give_up(finding, self.record_action)

    def _warn_manual(self, remedy: str) -> None:
        if remedy not in self._warned_manual:
            self._warned_manual.add(remedy)
            log.warning("gradwatch: %s", needs_automatic_loop_message(remedy, {"manual_optimization": True}))

    def _maybe_snapshot(self, step: int, new: list[Finding]) -> None:
        """Keep a healthy state for rollback: no sign of instability now, and none still open.

        Lasting conditions that a rollback would not cure (unnormalized inputs, a plateau, dead units)
        do not block snapshots; instability (non-finite values, spikes, explosion, divergence) does.
        """
        if (
            self.rollback is None
            or self.context is None
            or not self.snapshots.due(step, self.context.world_size == 1)
        ):
            return
        if any(f.severity != "info" and f.rule in UNSTABLE for f in new) or any(
            sev != "info"
            for d in self.detectors
            if d.rule in UNSTABLE
            for sev in getattr(d, "active", {}).values()
        ):
            return
        if self.last_stats is not None and any(
            r.grad_nonfinite or (r.loss is not None and not math.isfinite(r.loss))
            for r in self.last_stats.steps
        ):
            return
        if self.last_stats is not None and any(
            not math.isfinite(v) for v in self.last_stats.weight_norm.values()
        ):
            return
        lr = self.last_stats.steps[-1].lr if self.last_stats and self.last_stats.steps else None
        self.snapshots.take(step, self.context, lr if lr is not None else math.nan, self.lr.applied)

    def unit_activity(self, module: str | None) -> torch.Tensor | None:
        """Per-unit activity of ``module`` at the last sampled step (device vector), for remedies."""
        return self._acts.activity.get(module) if self._acts is not None and module else None

    def _derive(self, rows: list[_PendingRow]) -> torch.Tensor:
        """The ``[rows, ROW_FIELDS]`` values of the pending steps, computed for all of them at once.

        The common case (one optimizer, the same parameters with gradients every step, one 0-d loss per
        step, no GradScaler) on the CPU is :meth:`_derive_host`; everything else, and every accelerator, is
        :meth:`_derive_on_device`. Both give the same values (``tests/test_probes.py``).
        """
        device = self._layout.device if self._layout else torch.device("cpu")
        first = rows[0]
        if (
            device.type == "cpu"
            and len(first.norms) == 1
            and len(first.losses) == 1
            and all(
                len(r.norms) == 1
                and r.positions[0] is first.positions[0]
                and len(r.losses) == 1
                and r.losses[0].dim() == 0
                and r.losses[0].dtype == first.losses[0].dtype
                and r.scale is None
                for r in rows
            )
        ):
            return self._derive_host(rows)
        return self._derive_on_device(rows, device)

    def _derive_host(self, rows: list[_PendingRow]) -> torch.Tensor:
        """:meth:`_derive` on the CPU, where the norms are host memory: the norm matrix and the losses are
        read with ``tolist()`` (no wait on a CPU) and summarised in Python, then packed in one tensor for
        the transfer: four tensor ops instead of about fifteen, which inside a training step on a small CPU
        cost more than the Python on 20 x 8 floats (docs/performance.md)."""
        norms = torch.stack([r.norms[0] for r in rows]).tolist()  # sync: none, CPU tensors only
        losses = torch.stack([r.losses[0] for r in rows]).float().tolist()  # sync: none (CPU)
        positions = rows[0].positions[0].tolist()  # sync: none (CPU)
        values = []
        for row, loss in zip(norms, losses, strict=True):
            sq = sum([v * v for v in row])
            bad = (
                []
                if sq < math.inf
                else [p for v, p in zip(row, positions, strict=True) if not math.isfinite(v)]
            )
            first_x_bad = float(min(bad)) if bad else 0.0  # ROW_FIELDS: first position x bad
            values.append([loss, sq, float(len(bad)), first_x_bad, float(bool(bad)), math.nan, 0.0])
        return torch.tensor(values, dtype=torch.float32)

    def _derive_on_device(self, rows: list[_PendingRow], device: torch.device) -> torch.Tensor:
        """:meth:`_derive` as device ops: a handful on the stacked ``[rows, params]`` norm matrix in the
        common case, however many steps are pending, and one summary per row otherwise."""
        n_params = len(self._layout) if self._layout else 0
        zero = torch.zeros(len(rows), device=device)
        measured = [r for r in rows if r.norms]
        same = measured and all(
            len(r.norms) == 1 and r.positions[0] is measured[0].positions[0] for r in measured
        )
        if not measured:
            sq, count, first = zero, zero, zero - 1
        elif same and len(measured) == len(rows):
            n = torch.stack([r.norms[0] for r in rows])
            fin = torch.isfinite(n)
            count = fin.logical_not().sum(1).float()
            lowest = torch.where(fin, n_params, rows[0].positions[0]).amin(1)
            first = torch.where(lowest < n_params, lowest, -1).float()
            sq = (n * n).sum(1)
        else:  # several optimizers, or steps with different parameters: one row at a time
            per_row = []
            for r in rows:
                if r.norms:
                    s_, c_, f_ = nonfinite_summary(torch.cat(r.norms), torch.cat(r.positions), n_params)
                    per_row.append(torch.stack([s_.float(), c_.float(), f_.float()]))
                else:
                    per_row.append(torch.tensor([0.0, 0.0, -1.0], device=device))
            sq, count, first = torch.stack(per_row).to(device).unbind(1)
        first_loss = rows[0].losses[0] if rows[0].losses else None
        if first_loss is not None and all(
            len(r.losses) == 1 and r.losses[0].dim() == 0 and r.losses[0].dtype == first_loss.dtype
            for r in rows
        ):  # the common case: one 0-d loss per step, stacked in one op
            loss = torch.stack([r.losses[0] for r in rows]).float().to(device)
        elif all(len(r.losses) == 1 for r in rows):
            loss = torch.stack([r.losses[0].float().reshape(()) for r in rows]).to(device)
        else:
            loss = torch.stack(
                [torch.stack(r.losses).float().mean() if r.losses else zero[0] for r in rows]
            ).to(device)
        bad = (count > 0).float()
        if any(r.scale is not None for r in rows):  # AMP with a GradScaler
            nan = zero[0] + math.nan
            scale = torch.stack([r.scale if r.scale is not None else nan for r in rows]).to(device)
            skipped = torch.stack([r.skipped if r.skipped is not None else zero[0] for r in rows]).to(device)
        else:
            scale, skipped = zero + math.nan, zero
        return torch.stack([loss, sq.float(), count, first * bad, bad, scale, skipped], dim=1)

    def _build_stats(self, rows: list[_PendingRow], host: dict[str, Any], meta: dict[str, Any]) -> Stats:
        layout = self._layout
        names = layout.names if layout else []
        layers = layout.layers if layout else []
        records = []
        # Python floats, not NumPy scalars: the loop below does a dozen operations on each
        for r, (loss, gsq, count, first_x_bad, bad, scale, skipped) in zip(
            rows,
            host["rows"].tolist(),  # sync: none, a NumPy array already on the host
            strict=True,
        ):
            first_i = round(first_x_bad / bad) if bad > 0 else -1  # ranks agree under DDP: exact
            records.append(
                StepRecord(
                    step=r.step,
                    epoch=r.epoch,
                    loss=float(loss) if r.has_loss else None,
                    grad_norm=math.sqrt(gsq) if gsq >= 0 else math.nan,
                    grad_nonfinite=math.ceil(count - 1e-3) if math.isfinite(count) else 0,
                    first_nonfinite=names[first_i] if 0 <= first_i < len(names) else None,
                    lr=r.lr,
                    loss_scale=float(scale) if math.isfinite(scale) else None,
                    scaler_skipped=bool(skipped > 0),
                )
            )
        last = rows[-1]
        stats = Stats(step=last.step, epoch=last.epoch, steps=records, val_loss=self._val_loss)
        self._val_loss = None
        if "grad_layers" in host:
            stats.grad_norm = {n: math.sqrt(v) for n, v in zip(layers, host["grad_layers"], strict=True)}
        if "weight_sq" in host:
            stats.weight_norm = {
                n: (math.nan if bad > 0 else math.sqrt(v))
                for n, v, bad in zip(layers, host["weight_sq"], host["weight_bad"], strict=True)
            }
        if "update" in host:
            upd, before = host["update"]
            stats.update_ratio = {
                n: math.sqrt(u) / math.sqrt(b) if b > 0 else math.nan
                for n, u, b in zip(layers, upd, before, strict=True)
            }
            stats.update_ratio["total"] = math.sqrt(upd.sum()) / max(math.sqrt(before.sum()), 1e-30)
        if "activations" in host:
            act_names, kinds = meta["activation_names"]
            stats.activations = {
                n: ActivationStats(k, *(float(x) for x in v))
                for n, k, v in zip(act_names, kinds, host["activations"], strict=True)
            }
        if "inputs" in host:
            stats.inputs = InputStats(*(float(x) for x in host["inputs"]))
        return stats

    def _write_scalars(self, stats: Stats, notable: set[int]) -> None:
        """Per-step rows every :attr:`log_every_n_steps` steps and at every notable step (a finding or an
        action at that step, a non-finite value, a step the GradScaler skipped), then the read's own row
        (weight norms; per-layer curves; the heavy probes' values) at the run's first read, at the first
        read after a step of the logging cadence or a notable step (whether or not the read that held it
        had such values: an early-stopping flush has none), and with heavy-probe results. The last step's
        row and the last read's row, if not written, are kept for :meth:`finish` to close the curves with.

        Why not every step: each TensorBoard event costs ~25-60 us of the training thread (the writer's
        queue and its pure-Python CRC; docs/performance.md), the same cadence Lightning gives the user's
        own ``self.log`` calls. Every step still reaches the detectors.
        """
        every = self.log_every_n_steps if self.every_step else 1  # "scheduled": every row measured is written
        self._tail_row = None
        if notable or any((rec.step + 1) % every == 0 for rec in stats.steps):
            self._read_row_due = True
        self._track("grad_norm", [rec.grad_norm for rec in stats.steps])
        self._track("loss", [rec.loss for rec in stats.steps if rec.loss is not None])
        for rec in stats.steps:
            if not (
                (rec.step + 1) % every == 0
                or rec.step in notable
                or rec.grad_nonfinite
                or rec.scaler_skipped
                or not math.isfinite(rec.grad_norm)
                or (rec.loss is not None and not math.isfinite(rec.loss))
            ):
                self._tail_row = rec
                continue
            self._tail_row = None
            self._read_row_due = True
            self._emit_scalars(rec.step, self._row_values(rec))
        values: dict[str, float] = {}
        if stats.weight_norm:
            total = math.sqrt(sum(v * v for v in stats.weight_norm.values()))
            values["gradwatch/weight_norm/total"] = total
        if "total" in stats.update_ratio:
            values["gradwatch/update_ratio/total"] = stats.update_ratio["total"]
        if stats.inputs is not None:
            for field_name in ("mean", "std", "max_abs"):
                values[f"gradwatch/inputs/{field_name}"] = getattr(stats.inputs, field_name)
        if stats.activations:
            acts = stats.activations.values()
            values["gradwatch/activations/max_zero_frac"] = max(a.zero_frac for a in acts)
            values["gradwatch/activations/max_dead_unit_frac"] = max(a.dead_unit_frac for a in acts)
            values["gradwatch/activations/max_saturated_frac"] = max(a.saturated_frac for a in acts)
        if self.per_layer:
            for kind, per in (("grad_norm", stats.grad_norm), ("weight_norm", stats.weight_norm)):
                values.update({f"gradwatch/{kind}/{n}": v for n, v in per.items()})
            values.update(
                {f"gradwatch/update_ratio/{n}": v for n, v in stats.update_ratio.items() if n != "total"}
            )
            for name, a in stats.activations.items():
                for field_name in FIELDS:
                    values[f"gradwatch/activations/{name}/{field_name}"] = getattr(a, field_name)
        if not values:
            return
        if self._read_row_due or stats.activations or stats.inputs is not None or stats.update_ratio:
            self._emit_scalars(stats.step, values)
            self._read_row_due, self._tail_values = False, None
        else:  # between the logging cadence's steps, as the per-step rows
            self._tail_values = (stats.step, values)

    @staticmethod
    def _row_values(rec: StepRecord) -> dict[str, float]:
        """A step's TensorBoard row."""
        values = {"gradwatch/grad_norm/total": rec.grad_norm}
        if rec.grad_nonfinite:
            values["gradwatch/nonfinite/grad_params"] = rec.grad_nonfinite
        if rec.loss is not None:
            values["gradwatch/loss/train"] = rec.loss
        if rec.lr is not None:
            values["gradwatch/lr"] = rec.lr
        if rec.loss_scale is not None:
            values["gradwatch/amp/loss_scale"] = rec.loss_scale
            values["gradwatch/amp/scaler_skipped"] = float(rec.scaler_skipped)
        return values

    def _track(self, name: str, values: list[float]) -> None:
        """Keep the first, lowest, highest and last finite value of a series, for the summary."""
        finite = [v for v in values if math.isfinite(v)]
        if not finite:
            return
        low, high = min(finite), max(finite)
        r = self.ranges.setdefault(name, {"first": finite[0], "min": low, "max": high, "last": finite[-1]})
        r["min"], r["max"], r["last"] = min(r["min"], low), max(r["max"], high), finite[-1]

    def _emit_tail(self) -> None:
        """Write the rows the last read kept back: its own row (weight norms, ...), then its last step's."""
        if self._tail_values is not None:
            self._emit_scalars(*self._tail_values)
            self._tail_values, self._read_row_due = None, False
        if self._tail_row is not None:
            self._emit_scalars(self._tail_row.step, self._row_values(self._tail_row))
            self._tail_row = None

    def _emit_scalars(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.scalars(step, values)

    def record_action(self, action: Action) -> None:
        self.actions.append(action)
        for sink in self.sinks:
            sink.action(action)

    # ------------------------------------------------------------------ end of run
    def finish(self, status: str = "finished") -> dict[str, Any]:
        """Flush what is pending, write the summary, remove hooks. Returns the summary dict."""
        try:
            # skips decided on device are logged, not escalated: the run is over, and its weights were
            # never touched by them, so rolling back now would only throw training away
            self.flush(across_ranks=status == "finished", escalate=False)
            self._emit_tail()  # the last read and the run's last step close the curves
        except Exception as err:  # a failed run (a CUDA error, say) may not give its tensors back
            self._rows = []
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
        for sink in self.sinks:
            sink.summary(summary)
        return summary

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that changes over a run, for checkpoints.

        Pending device rows are read and judged first, but remedies wait for the next regular read: a
        checkpoint is being written, and its weights were captured before this call.
        """
        self.flush(respond=False)
        return {
            "version": STATE_VERSION,
            "detectors": {type(d).__name__: d.state_dict() for d in self.detectors},
            "remedies": {r.name: r.state_dict() for r in self.remedies},
            "findings": [f.to_dict() for f in self.findings],
            "actions": [a.to_dict() for a in self.actions],
            "steps_seen": self.steps_seen,
            "last_step": self.last_step,
            "last_epoch": self.last_epoch,
            "ranges": {k: dict(v) for k, v in self.ranges.items()},
            "lr": self.lr.state(),
            "best_val_loss": self.best.loss,
            "best_step": self.best.step,
            "deferred": [f.to_dict() for f in self._deferred],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in self.detectors:
            if type(d).__name__ in state.get("detectors", {}):
                d.load_state_dict(state["detectors"][type(d).__name__])
        for r in self.remedies:
            if r.name in state.get("remedies", {}):
                r.load_state_dict(state["remedies"][r.name])
        self.findings = [Finding.from_dict(f) for f in state.get("findings", [])]
        self.actions = [Action.from_dict(a) for a in state.get("actions", [])]
        self.steps_seen = state.get("steps_seen", 0)
        self.last_step = state.get("last_step", -1)
        self.last_epoch = state.get("last_epoch", 0)
        self.ranges = {k: dict(v) for k, v in state.get("ranges", {}).items()}
        self.lr.load(state.get("lr", {}))
        if state.get("version", STATE_VERSION) > STATE_VERSION:
            log.warning(
                "gradwatch: checkpoint state version %s is newer than this gradwatch's %s",
                state.get("version"),
                STATE_VERSION,
            )
        # the weights are not in the checkpoint: early stop keeps the last weights unless a better one comes
        self.best.loss = float(state.get("best_val_loss", math.inf))
        self.best.step = int(state.get("best_step", -1))
        self._deferred = [Finding.from_dict(f) for f in state.get("deferred", [])]
        self._resumed = True
