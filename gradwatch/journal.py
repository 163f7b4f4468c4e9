"""A run's findings and actions: exact totals per rule and per remedy, and the most recent of each.

A long run with a recurring condition (clipping at every read, an episode that keeps flapping) files a
finding or an action at every read; keeping every one grew memory and every checkpoint without bound.
:class:`Journal` keeps what the summary reports, exactly, as running totals (:class:`Tally`: per rule
the count, first step, worst severity and first layer; per remedy the count, first step and the rules
it answered), and the most recent :data:`RECENT` findings and actions as lists. The events file gets
every finding and action as it comes (the sinks write them, not this).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from gradwatch.findings import Action, Finding, Severity

#: How many findings, and how many actions, a monitor keeps in memory and in its checkpoint: the most
#: recent. The summary counts the whole run (:class:`Tally`); the events file has every one.
RECENT = 1000

#: The message of the stand-ins :meth:`Journal.evidence` and :meth:`Journal.history` make for older ones.
STAND_IN = "(older than the findings and actions kept in memory: from the run's totals)"


class Tally:
    """Running totals of a run's findings and actions: what the summary reports, for any length of run.

    ``rules``: rule -> ``{"rule", "severity" (the worst), "first_step" (the lowest), "count", "layer" (the
    first finding's)}``; ``remedies``: remedy -> ``{"remedy", "first_step" (the first action's), "count",
    "rules": {rule: count}}``, in the order first seen; ``alerts``: rule -> the step, epoch and severity of
    its latest warning or critical (the evidence a remedy weighs); ``severities``: findings by severity.
    """

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.rules: dict[str, dict[str, Any]] = {k: dict(v) for k, v in state.get("rules", {}).items()}
        self.remedies: dict[str, dict[str, Any]] = {
            k: {**v, "rules": dict(v["rules"])} for k, v in state.get("remedies", {}).items()
        }
        self.alerts: dict[str, dict[str, Any]] = {k: dict(v) for k, v in state.get("alerts", {}).items()}
        self.severities: Counter[str] = Counter(state.get("severities", {}))

    @classmethod
    def of(cls, findings: Iterable[Finding], actions: Iterable[Action]) -> Tally:
        tally = cls()
        for finding in findings:
            tally.add_finding(finding)
        for action in actions:
            tally.add_action(action)
        return tally

    @property
    def findings(self) -> int:
        return sum(row["count"] for row in self.rules.values())

    @property
    def actions(self) -> int:
        return sum(row["count"] for row in self.remedies.values())

    def add_finding(self, f: Finding) -> None:
        row = self.rules.setdefault(
            f.rule,
            {
                "rule": f.rule,
                "severity": f.severity.value,
                "first_step": f.step,
                "count": 0,
                "layer": f.layer,
            },
        )
        row["count"] += 1
        row["first_step"] = min(row["first_step"], f.step)
        if f.severity.rank > Severity(row["severity"]).rank:
            row["severity"] = f.severity.value
        self.severities[f.severity.value] += 1
        latest = self.alerts.get(f.rule)
        if f.severity != Severity.INFO and (latest is None or f.step >= latest["step"]):
            self.alerts[f.rule] = {"step": f.step, "epoch": f.epoch, "severity": f.severity.value}

    def add_action(self, a: Action) -> None:
        row = self.remedies.setdefault(
            a.remedy, {"remedy": a.remedy, "first_step": a.step, "count": 0, "rules": {}}
        )
        row["count"] += 1
        row["rules"][a.rule] = row["rules"].get(a.rule, 0) + 1

    def rule_rows(self) -> list[dict[str, Any]]:
        """The summary's ``rules``: one row per rule, by first step."""
        return sorted((dict(r) for r in self.rules.values()), key=lambda r: (r["first_step"], r["rule"]))

    def action_rows(self) -> list[dict[str, Any]]:
        """The summary's ``actions``: one row per remedy, by first step, with the rules it answered."""
        rows = [{**r, "rules": list(r["rules"])} for r in self.remedies.values()]
        return sorted(rows, key=lambda r: r["first_step"])

    def state(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers (a checkpoint's ``journal``); ``Tally(state)`` loads it."""
        return {
            "rules": {k: dict(v) for k, v in self.rules.items()},
            "remedies": {k: {**v, "rules": dict(v["rules"])} for k, v in self.remedies.items()},
            "alerts": {k: dict(v) for k, v in self.alerts.items()},
            "severities": dict(self.severities),
        }


class Journal:
    """What a monitor keeps of its run's findings and actions: the :class:`Tally` and the most recent
    :data:`RECENT` of each (``findings``, ``actions``: lists, oldest first, trimmed in place)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """A new run: new lists, no totals."""
        self.findings: list[Finding] = []
        self.actions: list[Action] = []
        self.tally = Tally()

    def load(self, findings: list[Finding], actions: list[Action], tally: dict[str, Any] | None) -> None:
        """A checkpoint's; without ``tally`` (a checkpoint from before the totals), rebuilt from the lists,
        which then held the whole run."""
        self.tally = Tally(tally) if tally is not None else Tally.of(findings, actions)
        self.findings, self.actions = list(findings), list(actions)
        _trim(self.findings)
        _trim(self.actions)

    def add_finding(self, finding: Finding) -> None:
        self.findings.append(finding)
        self.tally.add_finding(finding)
        _trim(self.findings)

    def add_action(self, action: Action) -> None:
        self.actions.append(action)
        self.tally.add_action(action)
        _trim(self.actions)

    def evidence(self) -> list[Finding]:
        """The findings a remedy weighs (whether a gradient rule warned since the best loss), newest last:
        the recent ones; once older ones were dropped, led by a stand-in for each rule's latest warning or
        critical, so what fell out of the list still counts."""
        if self.tally.findings <= len(self.findings):
            return self.findings
        alerts = sorted(self.tally.alerts.items(), key=lambda kv: kv[1]["step"])
        older = [Finding(rule, a["severity"], a["step"], a["epoch"], None, STAND_IN) for rule, a in alerts]
        return older + self.findings

    def history(self) -> list[Action]:
        """Every action so far, oldest first, for a give-up to count what was tried: the recent ones, led by
        a stand-in (one object, repeated) for each older one, by remedy and rule, from the totals."""
        if self.tally.actions <= len(self.actions):
            return list(self.actions)
        recent = Counter((a.remedy, a.rule) for a in self.actions)
        older: list[Action] = []
        for remedy, row in self.tally.remedies.items():
            for rule, count in row["rules"].items():
                stand_in = Action(remedy, row["first_step"], rule, message=STAND_IN)
                older += [stand_in] * max(0, count - recent[remedy, rule])
        return older + self.actions


def recent(name: str) -> property:
    """A monitor's ``findings`` or ``actions``: its journal's list (settable: a caller may wrap it)."""
    return property(
        lambda monitor: getattr(monitor.journal, name), lambda monitor, v: setattr(monitor.journal, name, v)
    )


def _trim(items: list[Any]) -> None:
    if len(items) > RECENT:  # in place: a caller holding the list sees it
        del items[: len(items) - RECENT]
