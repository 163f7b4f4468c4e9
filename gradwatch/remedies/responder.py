"""The ladder: which remedy answers a finding, in what order, within which budgets, and giving up.

The :class:`Responder` is the only caller of ``Remedy.respond``. A finding gets at most one action: the
first remedy of its rule's ladder that is ready (budget and cooldown, in the remedy's base class) and
acts. When every remedy that answers a critical finding is spent, ``early_stop`` stops the run with a
finding that says what was tried. After each read it also runs the snapshot policy, if rollback is on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from gradwatch.findings import Action, Finding
from gradwatch.remedies.base import Remedy
from gradwatch.remedies.context import RemedyContext
from gradwatch.remedies.early_stop import EarlyStop
from gradwatch.remedies.rollback import Rollback
from gradwatch.remedies.snapshot_policy import SnapshotPolicy
from gradwatch.remedies.snapshots import BestWeights
from gradwatch.setups import needs_automatic_loop_message

log = logging.getLogger("gradwatch")

#: Which remedies answer a rule, first choice first (a finding gets one action: the first remedy that acts).
LADDER: dict[str, tuple[str, ...]] = {
    "nonfinite": ("skip_step", "rollback"),
    "gradient_spike": ("clip_gradients",),
    "exploding_gradients": ("reduce_lr", "rollback"),
    "divergence": ("rollback", "reduce_lr"),
    "update_ratio": ("reduce_lr",),
    "dead_units": ("reinitialize",),
    "saturated_activations": ("reinitialize",),
    "poor_initialization": ("reinitialize",),
    "overfitting": ("early_stop",),
}

#: Rules whose findings a rollback makes moot: they describe the state it just discarded.
ROLLED_BACK_PAST = ("exploding_gradients", "divergence", "update_ratio", "gradient_spike", "loss_spike")

#: Rules whose history a rollback rewinds to the restored snapshot's: they judge the run's progress (a best
#: loss, a minimum gradient trend) and the discarded steps' part of it would misjudge the restored run.
#: The spike rules keep their running baselines: a scale estimate that stays true of the restored state
#: (and rewinding it would blind them for a warm-up right when a run is fragile).
REWOUND = ("divergence", "loss_plateau", "exploding_gradients")

#: How much the gradient norms must have risen with the loss for a divergence to move a remedy.
GRAD_RISE = 2.0

#: Findings that are gradient evidence for a divergence that came with (or after) them.
GRADIENT_RULES = ("gradient_spike", "exploding_gradients", "nonfinite")

#: The farthest back (in steps before a divergence finding) a gradient warning counts as its evidence.
EVIDENCE_STEPS = 100


def trend_only(finding: Finding, findings: list[Finding], not_before: int = -1) -> bool:
    """A loss-trend finding with no gradient evidence behind it: no remedy acts on it. A loss that rises
    on its own may be noise, a signed or non-progress loss, or a schedule; rolling back or cutting the LR
    on it made healthy runs end worse. A divergence is a real one when its gradient norms rose
    ``GRAD_RISE`` x with it, or when a gradient rule (a spike, an explosion, a non-finite step) warned
    since the loss was at its best: a learning rate too high shows in the gradients, if only as the
    spike that killed the units (``findings``: the run's findings so far, newest last). Since the best:
    from the first step of the window whose median was the best (the median lags the rise), and no
    more than :data:`EVIDENCE_STEPS` back, nor from before ``not_before`` (the last rollback: its
    discarded steps are no evidence about the restored run)."""
    if finding.rule != "divergence":
        return False
    if finding.evidence.get("grad_ratio", math.nan) >= GRAD_RISE:
        return False
    since = max(
        finding.evidence.get("best_from_step", finding.step), finding.step - EVIDENCE_STEPS, not_before
    )
    for earlier in reversed(findings):
        if earlier.step < since:
            break
        if earlier.rule in GRADIENT_RULES and earlier.severity != "info":
            return False
    return True


#: Findings that are symptoms of an open cause in the user's loop: while the cause's latest finding is a
#: warning or critical, no remedy answers them. Gradients that are never cleared add up step after step;
#: the explosion, divergence, spikes and dead units that follow are its symptoms, and reduce_lr, rollback,
#: clip_gradients and reinitialize on them made the run worse (the sum of all gradients keeps growing
#: after each). The cause's own finding says what to change.
SYMPTOMS: dict[str, tuple[str, ...]] = {
    "gradients_not_cleared": (
        "exploding_gradients",
        "divergence",
        "gradient_spike",
        "update_ratio",
        "dead_units",
        "saturated_activations",
    ),
}


def symptom_of_open_cause(finding: Finding, findings: list[Finding]) -> bool:
    """Whether ``finding`` is a symptom (:data:`SYMPTOMS`) of a cause whose latest finding in ``findings``
    (the run's so far, newest last) is still open (not an ``info`` one saying it ended)."""
    causes = [cause for cause, symptoms in SYMPTOMS.items() if finding.rule in symptoms]
    for earlier in reversed(findings if causes else []):
        if earlier.rule in causes:
            return earlier.severity != "info"
    return False


Publish = Callable[[list[Finding]], None]
Record = Callable[[Action], None]


class Responder:
    """Answers findings with the remedies of a run.

    Args:
        remedies: the run's remedies (their budgets and cooldowns are their own).
        ctx: what remedies may touch.
        publish: files a finding the responder raises itself (a give-up, an escalation).
        record: files an action.
        history: every action so far (recorded and pending), for a give-up to say what was tried.
        findings: every finding so far, for the evidence a loss-trend finding needs (:func:`trend_only`).
    """

    def __init__(
        self,
        remedies: list[Remedy],
        ctx: RemedyContext,
        publish: Publish,
        record: Record,
        history: Callable[[], list[Action]],
        findings: Callable[[], list[Finding]] = list,
    ) -> None:
        self.remedies = remedies
        self.findings = findings
        self.ctx = ctx
        self.publish, self.record, self.history = publish, record, history
        self.rollback = next((r for r in remedies if isinstance(r, Rollback)), None)
        self.early_stop = next((r for r in remedies if isinstance(r, EarlyStop)), None)
        self.snapshot_policy = SnapshotPolicy(ctx.snapshots) if self.rollback is not None else None
        self._warned_manual: set[str] = set()
        self._rolled_back_at = -1  # the step of the last rollback: evidence from before it is discarded
        #: Called after each rollback with the restored snapshot's rule states and :data:`REWOUND` (the
        #: monitor wires the judge's ``rewind``).
        self.on_rewind: Callable[[dict, tuple[str, ...]], None] = lambda states, rules: None

    def new_run(self) -> None:
        """A new fit (not a resume): no snapshot or best weights of another run, no step-based state."""
        self._rolled_back_at = -1
        self.ctx.snapshots.ring.clear()
        self.ctx.best = BestWeights()
        for remedy in self.remedies:
            remedy.new_run()

    def validation_rules(self) -> tuple[str, ...]:
        """The rules judged at once at each validation: those early stopping answers, when it is on."""
        early = self.early_stop
        return early.answers if early is not None and self.ctx.context is not None else ()

    def respond(self, findings: list[Finding], restored: bool = False) -> None:
        """Let the remedies answer new warning/critical findings, in ladder order; one action per finding.

        ``restored``: per-step protection escalated to a rollback in this read, after its statistics were
        measured: the non-finite values they show (weights included) are in the discarded state.
        """
        training = self.ctx.context
        if training is None:
            return
        rolled_back = restored
        moot = ROLLED_BACK_PAST + ("nonfinite",) if restored else ROLLED_BACK_PAST
        for finding in findings:
            if finding.severity == "info" or (rolled_back and finding.rule in moot):
                continue  # a rollback in this read already went back past what these findings saw
            if trend_only(finding, self.findings(), self._rolled_back_at):
                continue
            if symptom_of_open_cause(finding, self.findings()):
                continue  # the cause is in the user's loop: its own finding says what to change
            order = LADDER.get(finding.rule, ())
            answering = sorted(
                (r for r in self.remedies if finding.rule in r.answers),
                key=lambda r: order.index(r.name) if r.name in order else len(order),
            )
            acted = False
            for remedy in answering:
                if remedy.needs_automatic_loop and not training.automatic:
                    self._warn_manual(remedy.name)
                    continue
                if not remedy.ready(finding.step):
                    continue
                action = remedy.respond(finding, self.ctx)
                if action is not None:
                    self.record(action)
                    acted = True
                    if action.remedy == "rollback":
                        rolled_back = True
                        self._rewind(action.step)
                    break
            spent = answering and all(r.spent for r in answering)
            if not acted and spent and finding.severity == "critical":
                self.give_up(finding, self.record)

    def escalate(
        self, finding: Finding, record: Record, margin: int | None = None, keep_lr: bool = False
    ) -> bool:
        """Per-step protection is not enough (``finding``: repeated skips, or non-finite steps that got
        through): roll back if possible (``margin``, ``keep_lr``: see ``Rollback.restore``), else (the ladder spent)
        give up. Returns whether a snapshot was restored; ``False`` too while rollback is in its cooldown
        (the skipping goes on meanwhile)."""
        rollback = self.rollback
        if rollback is not None and not rollback.spent:
            if not rollback.ready(finding.step):
                return False
            action = rollback.restore(finding, self.ctx, margin, keep_lr)
            if action is not None:
                self.publish([finding])
                record(action)
                self._rewind(action.step)
                return True
        self.give_up(finding, record)
        return False

    def give_up(self, finding: Finding, record: Record) -> None:
        """The ladder for ``finding`` is spent: early_stop stops with a critical finding saying what was tried."""
        early = self.early_stop
        if early is None or early.stopped:
            return
        tried = [a for a in self.history() if a.rule == finding.rule]
        out = early.give_up(finding, tried, self.ctx)
        if out is not None:
            self.publish([out[0]])
            record(out[1])

    def snapshot(self, step: int, detectors: list) -> bool:
        """Keep the current state for rollback now, with the rules' state (a resumed run's restored state:
        without it a NaN burst before the first healthy read had nothing to go back to). Returns whether
        one was taken."""
        if self.snapshot_policy is None or self.ctx.context is None:
            return False
        snap = self.snapshot_policy.snapshots.take(step, self.ctx.context)
        snap.detectors = {type(d).__name__: d.state_dict() for d in detectors}
        return True

    def after_read(self, step: int, new: list[Finding], detectors: list, stats: object) -> None:
        """The snapshot policy's turn, once the read's findings are answered."""
        if self.snapshot_policy is not None:
            self.snapshot_policy.after_read(step, new, detectors, stats, self.ctx)

    def _rewind(self, step: int) -> None:
        """A rollback at ``step`` restored the newest snapshot left in the ring: the rules go back too."""
        self._rolled_back_at = step
        ring = self.ctx.snapshots.ring
        self.on_rewind(ring[-1].detectors if ring else {}, REWOUND)

    def _warn_manual(self, remedy: str) -> None:
        if remedy not in self._warned_manual:
            self._warned_manual.add(remedy)
            log.warning("gradwatch: %s", needs_automatic_loop_message(remedy, {"manual_optimization": True}))
