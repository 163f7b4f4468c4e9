"""``early_stop``: stop the run and keep the best weights; also the last rung of the ladder."""

from __future__ import annotations

from typing import Any

from gradwatch.findings import Action, Finding, Severity
from gradwatch.remedies.base import Remedy


class EarlyStop(Remedy):
    """Stop training and load the weights with the best validation loss seen (kept in host memory).

    Answers ``overfitting``, judged at each validation as it comes (with what is pending of the steps
    before it, or on its own right after a read; the other rules then see that validation at the next
    read). It is also what the responder does when a critical condition persists after every remedy that
    answers it has spent its budget: then it stops with a critical finding that lists what was tried
    (:meth:`give_up`).
    """

    name = "early_stop"
    answers = ("overfitting",)

    def __init__(self, restore_best: bool = True, cooldown_steps: int = 0, budget: int = 1) -> None:
        super().__init__(cooldown_steps=cooldown_steps, budget=budget)
        self.restore_best = restore_best
        self.stopped = False

    def respond(self, finding: Finding, ctx: Any) -> Action | None:
        training, best = ctx.context, ctx.best
        if training is None:
            return None
        restored = self.restore_best and best.restore(training.model)
        training.request_stop()
        self.stopped = True
        detail = {"best_val_loss": best.loss, "best_step": best.step, "weights_restored": restored}
        detail.update({k: v for k, v in finding.evidence.items() if k in ("val_loss", "train_loss")})
        where = (
            f"restored the weights of step {best.step} (val loss {best.loss:.4g})"
            if restored
            else "kept the last weights"
        )
        return self.action(finding, f"stopped training and {where}", **detail)

    def give_up(self, finding: Finding, tried: list[Action], ctx: Any) -> tuple[Finding, Action] | None:
        """Stop because the ladder is spent: a critical finding explaining what was tried, and the action."""
        training = ctx.context
        if training is None or self.stopped:
            return None
        training.request_stop()
        self.stopped = True
        counts: dict[str, int] = {}
        for a in tried:
            counts[a.remedy] = counts.get(a.remedy, 0) + 1
        tried_text = ", ".join(f"{k} x{v}" for k, v in counts.items()) or "nothing could act"
        explain = Finding(
            finding.rule,
            Severity.CRITICAL,
            finding.step,
            finding.epoch,
            finding.layer,
            f"{finding.rule} persists after gradwatch's remedies were spent ({tried_text}); stopping the run",
            {f"{k}_actions": float(v) for k, v in counts.items()},
            "gradwatch could not repair this run. Read the earlier findings for the cause, fix it (learning rate, "
            "initialization, data), and restart from the last good checkpoint.",
        )
        action = self.record(
            Action(
                self.name,
                finding.step,
                finding.rule,
                {"reason": "remedies exhausted", **counts},
                finding.epoch,
                f"stopped training: {finding.rule} persists after {tried_text}",
            )
        )
        return explain, action

    def new_run(self) -> None:
        super().new_run()
        self.stopped = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stopped = bool(state.get("stopped", self.stopped))
