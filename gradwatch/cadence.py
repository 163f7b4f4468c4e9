"""Which steps are scheduled, probed and measured.

- **scheduled**: the schedule (``every_n_steps``) says so: statistics are read back and judged.
- **probed**: the heavy probes (activation hooks, input range, the weight copy behind update ratios) run
  on every scheduled step of the first :data:`DENSE_PROBE_STEPS` steps, where initialization faults show,
  then on the first scheduled step at least ``probe_every_n_steps`` after the last probe.
- **passed over** (``measure="scheduled"`` only): a step between the scheduled ones is not measured at all.

Each question is asked once per step and the answer kept, so every hook of a step sees the same answer
whatever a user's schedule callable does when asked again. A function of the steps seen in this fit
alone, so every DDP rank decides alike.
"""

from __future__ import annotations

from gradwatch.schedules import Schedule

#: The heavy probes run at every read during a run's first steps (initialization faults show there).
DENSE_PROBE_STEPS = 200


class Cadence:
    """The schedule of one monitor, with what it remembers within a fit."""

    def __init__(self, schedule: Schedule, every_step: bool, probe_every: int | None) -> None:
        self.schedule = schedule
        self.every_step = every_step
        self.probe_every = probe_every
        #: The step of the last probe (in checkpoints: a resumed run keeps the probe cadence).
        self.last_probe: int | None = None
        self.reset()

    def reset(self) -> None:
        """The end of a fit, or a new one: no step's answer remembered (:attr:`last_probe` stays: a new
        fit's :func:`gradwatch.state.fresh` clears it, a resume loads it)."""
        self._scheduled: tuple[int, bool] = (-1, False)  # (step, the schedule's answer)
        self._probed: tuple[int, bool] = (-1, False)  # (step, decision)
        #: measure="scheduled": True while a batch, or an optimizer step, is passed over (not measured).
        self.passing = False
        self._passed: tuple[int, int] | None = None  # (step, epoch) of the optimizer step passed over

    def scheduled(self, step: int) -> bool:
        memo_step, due = self._scheduled
        if memo_step != step:
            due = bool(self.schedule(step))
            self._scheduled = (step, due)
        return due

    def probing(self, step: int) -> bool:
        memo_step, due = self._probed
        if memo_step != step:
            every = self.probe_every
            due = self.scheduled(step) and (
                every is None
                or step < DENSE_PROBE_STEPS
                or self.last_probe is None
                or step - self.last_probe >= every
            )
            if due:
                self.last_probe = step
            self._probed = (step, due)
        return due

    def start_batch(self, step: int) -> bool:
        """A batch starts (``measure="scheduled"``): returns whether it is passed over."""
        self.passing = not self.scheduled(step)
        return self.passing

    def pass_over(self, step: int, epoch: int, recording: bool) -> bool:
        """Whether optimizer step ``step`` goes unmeasured (``measure="scheduled"``, not a scheduled step).
        ``recording``: a step is already being recorded (a second optimizer of a measured step)."""
        if self.every_step or recording:
            return False
        if not self.passing and self.scheduled(step):
            return False
        self.passing = True
        if self._passed is None:  # not a second optimizer of the step: the step counts at its batch end
            self._passed = (step, epoch)
        return True

    def end_passed(self) -> tuple[int, int] | None:
        """A passed-over batch ends: the ``(step, epoch)`` of its optimizer step if one ran (the step ends
        here), else ``None`` (an earlier micro-batch of the step: still passing)."""
        passed = self._passed
        if passed is not None:
            self.passing, self._passed = False, None
        return passed
