"""When to look: schedules are plain ``step -> bool`` callables."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from gradwatch.errors import ConfigError, check_positive_int

Schedule = Callable[[int], bool]


class EveryN:
    """True on steps ``0, n, 2n, ...``: a scheduled step every ``n`` optimizer steps.

    Example:
        >>> s = EveryN(4)
        >>> [step for step in range(10) if s(step)]
        [0, 4, 8]
    """

    def __init__(self, n: int) -> None:
        self.n = check_positive_int("every_n_steps", n, 20)

    def __call__(self, step: int) -> bool:
        return step % self.n == 0

    def __repr__(self) -> str:
        return f"EveryN({self.n})"


def as_schedule(name: str, value: int | Schedule, example: int) -> Schedule:
    """Accept an ``int`` cadence or a ``step -> bool`` callable; anything else is a ``ConfigError``."""
    if callable(value) and not isinstance(value, int):
        try:
            inspect.signature(value).bind(0)
        except TypeError:
            raise ConfigError(
                f"{name} must take the optimizer step as its one argument (step -> bool), got {value!r}. "
                f"Write e.g. {name}=lambda step: step % {example} == 0."
            ) from None
        except ValueError:  # a builtin without a signature: trust it
            pass
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be a positive int or a callable step -> bool, got {value!r} "
            f"({type(value).__name__}). Write e.g. {name}={example}."
        )
    check_positive_int(name, value, example)
    return EveryN(value)
