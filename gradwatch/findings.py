"""What gradwatch says (``Finding``) and what it does (``Action``), and the id vocabulary.

The rule and remedy ids are a public contract: events files, alerts and user code match on them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

RULES: tuple[str, ...] = (
    "nonfinite",
    "exploding_gradients",
    "gradient_spike",
    "loss_spike",
    "divergence",
    "vanishing_gradients",
    "saturated_activations",
    "dead_units",
    "poor_initialization",
    "unnormalized_inputs",
    "overfitting",
    "loss_plateau",
    "update_ratio",
    "frozen_weights",
    "lr_collapsed",
    "eval_mode_training",
    "unoptimized_parameters",
    "repeated_batch",
    "gradients_not_cleared",
)

REMEDIES: tuple[str, ...] = (
    "skip_step",
    "clip_gradients",
    "reduce_lr",
    "rollback",
    "reinitialize",
    "early_stop",
)


class Severity(str, Enum):
    """How urgent a finding is. Compares equal to its string value (``Severity.WARNING == "warning"``)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


def json_number(value: float) -> float | str:
    """Make a float JSON-safe: non-finite values become the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
    value = float(value)
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return json_number(obj)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Enum):
        return obj.value
    return obj


@dataclass
class Finding:
    """One diagnosis: what happened, where, the numbers behind it and what to change.

    Attributes:
        rule: rule id from :data:`RULES`.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        step: the optimizer step (``trainer.global_step`` during that step) where the condition was seen.
        epoch: the epoch of that step.
        layer: module or parameter name, or ``None`` when the finding is about the whole model.
        message: one sentence with the numbers.
        evidence: the numbers, by name.
        advice: why it matters and what to change.
    """

    rule: str
    severity: Severity
    step: int
    epoch: int
    layer: str | None
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    advice: str = ""

    def __post_init__(self) -> None:
        self.severity = Severity(self.severity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the contract fields (non-finite numbers as strings)."""
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        evidence = {k: float(v) for k, v in data.get("evidence", {}).items()}
        return cls(
            rule=data["rule"],
            severity=Severity(data["severity"]),
            step=int(data["step"]),
            epoch=int(data.get("epoch", 0)),
            layer=data.get("layer"),
            message=data.get("message", ""),
            evidence=evidence,
            advice=data.get("advice", ""),
        )

    def __str__(self) -> str:
        where = f" in {self.layer}" if self.layer else ""
        return f"[{self.severity.value}] {self.rule} at step {self.step}{where}: {self.message}"


@dataclass
class Action:
    """One change gradwatch made to the run, with the finding it answers and before/after numbers.

    Attributes:
        remedy: remedy id from :data:`REMEDIES`.
        step: the optimizer step it acted on.
        rule: the rule id of the finding it answers.
        detail: before/after numbers and parameters, e.g. ``{"lr_before": 0.1, "lr_after": 0.05}``.
        epoch: the epoch of that step.
        message: one sentence saying what was done and why.
    """

    remedy: str
    step: int
    rule: str
    detail: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        return cls(
            remedy=data["remedy"],
            step=int(data["step"]),
            rule=data["rule"],
            detail=dict(data.get("detail", {})),
            epoch=int(data.get("epoch", 0)),
            message=data.get("message", ""),
        )

    def __str__(self) -> str:
        return f"{self.remedy} at step {self.step} (answering {self.rule}): {self.message}"
