"""Small running statistics detectors keep between checks, as plain floats so they checkpoint anywhere."""

from __future__ import annotations

import math
from typing import Any


class EMA:
    """Exponential moving average with a matching variance (West's EMA variance), as used by ZClip.

    ``mean_t = a*mean + (1-a)*x``; ``var_t = a*(var + (1-a)*(x-mean)^2)``. ``z(x)`` is the z-score of
    ``x`` against the current estimate. The state is three floats.

    Example:
        >>> e = EMA(0.9)
        >>> for x in [1.0, 1.0, 1.0, 1.0]:
        ...     e.update(x)
        >>> e.mean, e.n
        (1.0, 4)
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean = 0.0
        self.var = 0.0
        self.n = 0

    def update(self, x: float) -> None:
        if self.n == 0:
            self.mean, self.var = x, 0.0
        else:
            d = x - self.mean
            self.mean += (1 - self.alpha) * d
            self.var = self.alpha * (self.var + (1 - self.alpha) * d * d)
        self.n += 1

    def z(self, x: float, floor: float = 1e-12) -> float:
        return (x - self.mean) / math.sqrt(max(self.var, floor))

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "n": self.n}

    def load(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.n = float(state["mean"]), float(state["var"]), int(state["n"])


def safe_log(x: float, floor: float = 1e-30) -> float:
    return math.log(max(x, floor))
