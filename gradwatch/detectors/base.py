"""The detector interface: pure judges of :class:`~gradwatch.stats.Stats`."""

from __future__ import annotations

import copy
import inspect
from typing import Any, ClassVar

from gradwatch.errors import ConfigError
from gradwatch.findings import Finding, Severity
from gradwatch.stats import Stats

#: rule id -> detector class; filled by ``Detector.__init_subclass__``.
REGISTRY: dict[str, type[Detector]] = {}


class Detector:
    """Base class of every rule.

    A detector is pure: ``check`` reads the statistics of one scheduled step (with every step's
    record since the previous one) and returns findings. It touches no trainer, does no I/O and makes
    no torch call. What it remembers between checks (baselines, windows, which conditions are already
    reported) lives in plain attributes listed in :attr:`state_fields`, so a resumed run judges exactly
    as the original would have. Attributes with ``state()``/``load()`` (running statistics) are saved
    through those.

    Findings are de-duplicated by episode: :meth:`report` emits a finding when a condition starts or
    worsens (higher severity), and :meth:`resolve` emits one ``info`` finding when it ends.
    """

    rule: ClassVar[str] = ""
    state_fields: ClassVar[tuple[str, ...]] = ()
    advice: ClassVar[str] = ""
    #: What the rule assumes about the signal it judges (docs/rules.md prints it).
    assumes: ClassVar[str] = ""
    #: The ``loss=`` kinds this rule judges (rules that read the training loss's trend leave out
    #: ``"surrogate"``: such a loss is not a progress measure). The monitor sets :attr:`loss_kind`.
    loss_kinds: ClassVar[tuple[str, ...]] = ("minimize", "signed", "surrogate")
    loss_kind: str = "minimize"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.rule:
            REGISTRY[cls.rule] = cls

    @property
    def active(self) -> dict[str, str]:
        """Open episodes: key -> severity of the last finding reported for it."""
        if not hasattr(self, "_active"):
            self._active: dict[str, str] = {}
        return self._active

    def check(self, step: int, stats: Stats) -> list[Finding]:
        raise NotImplementedError

    # ------------------------------------------------------------------ episodes
    def report(self, key: str, finding: Finding) -> list[Finding]:
        """Open (or worsen) the episode ``key``; returns ``[finding]`` only if it is new or more severe."""
        previous = self.active.get(key)
        if previous is not None and Severity(previous).rank >= finding.severity.rank:
            return []
        self.active[key] = finding.severity.value
        return [finding]

    def resolve(
        self,
        key: str,
        step: int,
        epoch: int,
        layer: str | None,
        message: str,
        evidence: dict[str, float] | None = None,
    ) -> list[Finding]:
        """Close the episode ``key`` if open, with one ``info`` finding saying so."""
        if self.active.pop(key, None) is None:
            return []
        return [Finding(self.rule, Severity.INFO, step, epoch, layer, message, evidence or {}, "")]

    def finding(
        self,
        severity: Severity | str,
        step: int,
        epoch: int,
        layer: str | None,
        message: str,
        evidence: dict[str, float],
        advice: str | None = None,
    ) -> Finding:
        return Finding(
            self.rule,
            Severity(severity),
            step,
            epoch,
            layer,
            message,
            evidence,
            self.advice if advice is None else advice,
        )

    def new_run(self) -> None:
        """Forget everything learned from an earlier run (a new fit, not a resume).

        Resets the state to that of a fresh instance with the same thresholds.
        """
        self.active.clear()
        fresh = copy.copy(self)
        try:
            type(self).__init__(
                fresh, **{k: getattr(self, k) for k in _init_args(type(self)) if hasattr(self, k)}
            )
        except TypeError:
            return  # a plugin whose constructor cannot be replayed keeps its state
        for name in self.state_fields:
            setattr(self, name, getattr(fresh, name))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"active": dict(self.active)}
        for name in self.state_fields:
            value = getattr(self, name)
            # a copy of a list: detectors may grow their windows in place after this
            out[name] = value.state() if hasattr(value, "state") else copy.copy(value)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active.clear()
        self.active.update(state.get("active", {}))
        for name in self.state_fields:
            if name not in state:  # fields added later keep their defaults
                continue
            current = getattr(self, name)
            if hasattr(current, "load"):
                current.load(state[name])
            else:  # a copy: the checkpoint's own objects stay as they were
                setattr(self, name, copy.copy(state[name]))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _init_args(cls: type) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_count(owner: str, name: str, value: object, low: int = 0, example: int = 1) -> int:
    """Validate a whole number ``> low`` (a count of steps or reads); a float such as 0.5 is refused rather
    than rounded to a value that changes what the rule does."""
    if isinstance(value, bool) or not isinstance(value, int) or not value > low:
        raise ConfigError(
            f"{owner}({name}=...) must be a whole number > {low}, got {value!r}. Write e.g. {name}={example}."
        )
    return value


def check_fraction(owner: str, name: str, value: object, example: float = 0.97) -> float:
    """Validate a number strictly between 0 and 1 (an EMA's decay)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ConfigError(
            f"{owner}({name}=...) must be a number between 0 and 1, got {value!r}. Write e.g. {name}={example}."
        )
    return float(value)


def check_threshold(owner: str, name: str, value: object, low: float = 0.0, example: float = 1.0) -> float:
    """Validate a numeric threshold ``> low``; raise :class:`ConfigError` naming the detector and argument."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > low:
        raise ConfigError(
            f"{owner}({name}=...) must be a number > {low:g}, got {value!r}. Write e.g. {name}={example}."
        )
    return float(value)
