"""The detector interface: pure judges of :class:`~gradwatch.stats.Stats`."""

from __future__ import annotations

from typing import Any, ClassVar

from gradwatch.findings import Finding
from gradwatch.stats import Stats

#: rule id -> detector class; filled by ``Detector.__init_subclass__``.
REGISTRY: dict[str, type[Detector]] = {}


class Detector:
    """Base class of every rule.

    A detector is pure: ``check`` reads the statistics of one scheduled step (with every step's
    record since the previous one) and returns findings. It touches no trainer, does no I/O and makes
    no torch call. What it remembers between checks (baselines, windows, whether a condition is
    already reported) lives in plain attributes that :meth:`state_dict` returns, so a resumed run
    judges exactly as the original would have.

    Subclasses set :attr:`rule` and list their remembered attributes in :attr:`state_fields`.
    """

    rule: ClassVar[str] = ""
    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.rule:
            REGISTRY[cls.rule] = cls

    def check(self, step: int, stats: Stats) -> list[Finding]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.state_fields:
            if name in state:  # fields added later keep their defaults
                setattr(self, name, state[name])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
