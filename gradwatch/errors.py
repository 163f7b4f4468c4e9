"""The one exception type gradwatch raises for bad configuration."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(TypeError, ValueError):
    """Raised at construction when an argument is wrong.

    It subclasses both ``TypeError`` and ``ValueError`` so callers that catch either keep working.
    The message names the argument, the value received and what to write instead.
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_positive_int(name: str, value: object, example: int) -> int:
    """Validate ``value`` as a positive ``int`` (bools are rejected), naming ``name`` in the error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{name} must be a positive int, got {value!r} ({type(value).__name__}). Write e.g. {name}={example}."
        )
    if value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value}. Write e.g. {name}={example}.")
    return value
