"""Runs the rules: on every read, and on a validation judged at once (for early stopping).

Detectors are pure (``check(step, stats) -> findings``); the :class:`Judge` decides which statistics each
one is shown. A validation judged on its own (right after a read, so that early stopping acts at once) is
shown to the rules early stopping answers; the other rules see it at the next read, and those rules are
not shown it twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gradwatch.detectors import Detector
from gradwatch.findings import Finding
from gradwatch.stats import Stats


class Judge:
    """``validation_rules()``: the rules judged at once at each validation (none without early stopping)."""

    def __init__(self, detectors: list[Detector], validation_rules: Callable[[], tuple[str, ...]]) -> None:
        self.all = detectors
        #: the rules that judge this run's loss kind (``loss="surrogate"`` leaves out the loss-trend rules)
        self.detectors = [d for d in detectors if d.loss_kind in d.loss_kinds]
        self.validation_rules = validation_rules
        self._val_judged = False  # the validation the next read carries was judged at once already

    def new_run(self) -> None:
        """A new fit (not a resume): baselines of another run would misjudge this one."""
        for detector in self.detectors:
            detector.new_run()
        self._val_judged = False

    def rewind(self, states: dict[str, Any], rules: tuple[str, ...]) -> None:
        """A rollback restored an older state: the rules in ``rules`` go back with it to ``states`` (their
        state when that snapshot was taken, by class name), or forget everything where none was kept.
        Their baselines and episodes described the discarded steps: a best loss from past the snapshot
        misjudged the restored run as diverging and rolled it back again."""
        for detector in self.detectors:
            if detector.rule not in rules:
                continue
            saved = states.get(type(detector).__name__)
            if saved is None:
                detector.new_run()
            else:
                detector.load_state_dict(saved)

    def read(self, stats: Stats) -> list[Finding]:
        """Every rule on this read."""
        judged, self._val_judged = self._val_judged, False
        rules = self.validation_rules()
        seen = replace(stats, val_loss=None) if judged else stats
        return [f for d in self.detectors for f in d.check(stats.step, seen if d.rule in rules else stats)]

    def new_validation(self) -> None:
        """A validation came: not judged yet."""
        self._val_judged = False

    def validation(self, step: int, epoch: int, val_loss: float) -> list[Finding]:
        """The validation rules on this validation alone (no step rows)."""
        stats = Stats(step=step, epoch=epoch, steps=[], val_loss=val_loss)
        self._val_judged = True
        rules = self.validation_rules()
        return [f for d in self.detectors if d.rule in rules for f in d.check(stats.step, stats)]
