"""The remedy interface, and how ``remedies="auto" | "off" | [...]`` is resolved.

Remedies are the only code that changes training. Each answers findings of some rules and returns
an :class:`~gradwatch.findings.Action` with before/after numbers. Cooldowns and budgets live here,
in the base class, so every remedy is bounded the same way.
"""

from __future__ import annotations

from typing import Any, ClassVar

from gradwatch.errors import ConfigError, did_you_mean
from gradwatch.findings import REMEDIES, Action, Finding

#: remedy id -> remedy class; filled by ``Remedy.__init_subclass__``.
REGISTRY: dict[str, type[Remedy]] = {}


class Remedy:
    """Base class of every remedy.

    Args:
        cooldown_steps: steps after an action during which this remedy does not act again.
        budget: most actions this remedy may take in one run.
    """

    name: ClassVar[str] = ""
    #: Rule ids this remedy answers, in the order of the ladder.
    answers: ClassVar[tuple[str, ...]] = ()
    #: True when acting needs Lightning's automatic loop (it steps schedulers between batches).
    needs_automatic_loop: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, cooldown_steps: int = 0, budget: int = 1_000_000) -> None:
        if isinstance(cooldown_steps, bool) or not isinstance(cooldown_steps, int) or cooldown_steps < 0:
            raise ConfigError(
                f"{type(self).__name__}(cooldown_steps=...) must be an int >= 0, got {cooldown_steps!r}."
                " Write e.g. cooldown_steps=50."
            )
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(
                f"{type(self).__name__}(budget=...) must be an int >= 0, got {budget!r}. Write e.g. budget=10."
            )
        self.cooldown_steps = cooldown_steps
        self.budget = budget
        self.used = 0
        self.last_step: int | None = None

    def ready(self, step: int) -> bool:
        """Whether the budget and the cooldown allow acting at ``step``."""
        if self.used >= self.budget:
            return False
        return self.last_step is None or step - self.last_step >= self.cooldown_steps

    def record(self, action: Action) -> Action:
        self.used += 1
        self.last_step = action.step
        return action

    def new_run(self) -> None:
        """A new fit (not a resume): a fresh budget, no cooldown (k-fold and seed loops reuse a monitor)."""
        self.last_step, self.used = None, 0

    @property
    def spent(self) -> bool:
        return self.used >= self.budget

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        """Act on ``finding``; return the :class:`Action` taken, or ``None``. Subclasses implement this.

        ``ctx`` is a :class:`~gradwatch.remedies.context.RemedyContext`, all a remedy may touch: the
        training objects (``ctx.context``: model, optimizers, schedulers, scaler, a way to stop) and the
        shared state (``ctx.lr``, ``ctx.snapshots``, ``ctx.best``, ``ctx.unit_activity(module)``).
        """
        raise NotImplementedError

    def action(self, finding: Finding, message: str, **detail: Any) -> Action:
        """Build and count an :class:`Action` answering ``finding``."""
        return self.record(Action(self.name, finding.step, finding.rule, detail, finding.epoch, message))

    def state_dict(self) -> dict[str, Any]:
        return {"used": self.used, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.used = state.get("used", self.used)
        self.last_step = state.get("last_step", self.last_step)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cooldown_steps={self.cooldown_steps}, budget={self.budget})"


def resolve_remedies(remedies: Any) -> list[Remedy]:
    """Turn the ``remedies=`` argument into remedy instances, or raise :class:`ConfigError`.

    ``"auto"`` takes every implemented remedy with its defaults; ``"off"`` none; a list may mix remedy
    ids (strings) and :class:`Remedy` instances. The caller's list is not modified.
    """
    hint = 'Write remedies="auto", remedies="off", or a list such as remedies=["skip_step"].'
    if isinstance(remedies, str):
        if remedies == "auto":
            return [REGISTRY[name]() for name in REMEDIES if name in REGISTRY]
        if remedies == "off":
            return []
        raise ConfigError(
            f"remedies={remedies!r} is not a mode.{did_you_mean(remedies, ['auto', 'off'])} {hint}"
        )
    if not isinstance(remedies, list | tuple):
        raise ConfigError(f"remedies must be 'auto', 'off' or a list, got {type(remedies).__name__}. {hint}")
    out: list[Remedy] = []
    for item in remedies:
        if isinstance(item, Remedy):
            out.append(item)
        elif isinstance(item, str):
            if item not in REMEDIES:
                raise ConfigError(
                    f"unknown remedy {item!r} in remedies={list(remedies)!r}.{did_you_mean(item, REMEDIES)}"
                    f" Known remedy ids: {', '.join(REMEDIES)}."
                )
            if item not in REGISTRY:
                available = ", ".join(REGISTRY) or "none yet"
                raise ConfigError(
                    f"remedy {item!r} is a gradwatch remedy id but is not implemented in this version "
                    f'(implemented: {available}). Write remedies="off" to only observe.'
                )
            out.append(REGISTRY[item]())
        else:
            raise ConfigError(
                f"remedies entries must be remedy ids (str) or Remedy objects, got {item!r} "
                f"({type(item).__name__}). {hint}"
            )
    names = [r.name for r in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"remedy {dupes[0]!r} is listed twice in remedies=...; list each remedy once.")
    return out
