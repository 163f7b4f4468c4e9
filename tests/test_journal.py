"""A long run keeps exact totals of its findings and actions and only the most recent ones (gradwatch.journal):
memory and checkpoints stay bounded, the summary stays exact, the events file keeps every one."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import pytorch_lightning as pl
import torch
from models import DigitsMLP, digits_loaders, trainer

import gradwatch
from gradwatch import journal
from gradwatch.findings import Action, Finding
from gradwatch.remedies import ClipGradients
from gradwatch.remedies.responder import trend_only
from gradwatch.sinks.events import read_events
from gradwatch.sinks.summary import build_summary


def _monitor(events):
    # clipping at mean + 0.1 std after 2 steps: an action at nearly every read, a run-long condition
    clip = ClipGradients(z=0.1, warmup_steps=2)
    return gradwatch.HealthMonitor(every_n_steps=2, remedies=[clip], events_path=events, print_summary=False)


def _fit(tmp_path, mon, epochs, ckpt_path=None):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / f"ckpt{epochs}"), save_last=True)
    t = trainer(tmp_path, [mon, ckpt], max_epochs=epochs, logger=False, enable_checkpointing=True)
    t.fit(DigitsMLP(lr=1.5), digits_loaders(batch_size=16)[0], ckpt_path=ckpt_path)
    return str(tmp_path / f"ckpt{epochs}" / "last.ckpt")


def _check_against_the_events_file(mon, events):
    """The summary's counts are the events file's (every finding and action of every run written to it);
    the monitor holds the last RECENT of each, the file's last ones."""
    lines = read_events(events)
    found = [Finding.from_dict(e) for e in lines if e["kind"] == "finding"]
    done = [Action.from_dict(e) for e in lines if e["kind"] == "action"]
    summary = [e for e in lines if e["kind"] == "summary"][-1]
    assert len(found) > journal.RECENT and len(done) > journal.RECENT  # the lists were capped
    reference = build_summary(
        found, done, status="", steps=0, epochs=0, remedies=[], ranges={}, events_path=""
    )
    assert summary["rules"] == reference["rules"] and summary["actions"] == reference["actions"]
    assert sum(r["count"] for r in summary["actions"]) == len(done)
    assert [f.to_dict() for f in mon.findings] == [f.to_dict() for f in found[-journal.RECENT :]]
    assert [a.to_dict() for a in mon.actions] == [a.to_dict() for a in done[-journal.RECENT :]]
    return summary


def test_a_long_run_keeps_exact_totals_and_only_the_recent_findings_and_actions(tmp_path, monkeypatch):
    """180 steps, an action at nearly every read: memory and checkpoint hold the last 3 findings and
    actions; the summary's counts equal the events file's, across a resume."""
    monkeypatch.setattr(journal, "RECENT", 3)
    events = tmp_path / "events.jsonl"
    first = _monitor(events)
    ckpt = _fit(tmp_path, first, 1)
    _check_against_the_events_file(first, events)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert len(saved["findings"]) == len(saved["actions"]) == 3  # the checkpoint is bounded too
    assert saved["journal"]["remedies"]["clip_gradients"]["count"] > 3

    resumed = _monitor(events)
    _fit(tmp_path, resumed, 2, ckpt_path=ckpt)
    summary = _check_against_the_events_file(resumed, events)  # the resumed run continues the counts
    assert summary["steps"] == 2 * len(digits_loaders(batch_size=16)[0])


def test_a_checkpoint_without_totals_rebuilds_them_from_its_lists(tmp_path, monkeypatch):
    """A checkpoint written before the totals (``journal`` missing; its lists held the whole run) resumes
    with exact counts, and the lists are capped from then on."""
    events = tmp_path / "events.jsonl"
    first = _monitor(events)
    ckpt = _fit(tmp_path, first, 1)
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["callbacks"][first.state_key].pop("journal", None)
    torch.save(checkpoint, tmp_path / "old.ckpt")

    monkeypatch.setattr(journal, "RECENT", 3)
    resumed = _monitor(events)
    _fit(tmp_path, resumed, 2, ckpt_path=str(tmp_path / "old.ckpt"))
    _check_against_the_events_file(resumed, events)


def _reference_rules(findings):
    """The summary's rule rows as they were built from every finding (before the totals)."""
    rules = {}
    for f in findings:
        row = rules.setdefault(
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
        if f.severity.rank > gradwatch.Severity(row["severity"]).rank:
            row["severity"] = f.severity.value
    return sorted(rules.values(), key=lambda r: (r["first_step"], r["rule"]))


@pytest.mark.parametrize("seed", range(5))
def test_totals_and_stand_ins_answer_as_the_full_lists_do(monkeypatch, seed):
    """Random findings and actions past RECENT: the totals equal the rows built from every one, the
    evidence a remedy weighs (``trend_only``) and a give-up's counts of what was tried are the same as
    with the full lists."""
    monkeypatch.setattr(journal, "RECENT", 5)
    rng = random.Random(seed)
    rules = ["gradient_spike", "nonfinite", "divergence", "dead_units"]
    kept, found, done = journal.Journal(), [], []
    for step in range(60):
        if rng.random() < 0.5:
            f = Finding(
                rng.choice(rules),
                rng.choice(["info", "warning", "critical"]),
                step,
                0,
                rng.choice(["a", None]),
                "m",
            )
            kept.add_finding(f)
            found.append(f)
        if rng.random() < 0.6:
            a = Action(rng.choice(["clip_gradients", "skip_step"]), step, rng.choice(rules))
            kept.add_action(a)
            done.append(a)
    assert len(kept.findings) == len(kept.actions) == 5
    assert kept.tally.rule_rows() == _reference_rules(found)
    assert kept.tally.severities == Counter(f.severity.value for f in found)
    for since in range(0, 60, 3):
        divergence = Finding("divergence", "warning", 60, 0, None, "", {"best_from_step": since})
        assert trend_only(divergence, kept.evidence()) == trend_only(divergence, found), since
    history = Counter((a.remedy, a.rule) for a in kept.history())
    assert history == Counter((a.remedy, a.rule) for a in done)
    loaded = journal.Journal()
    loaded.load(kept.findings, kept.actions, kept.tally.state())
    assert loaded.tally.state() == kept.tally.state() and loaded.findings == kept.findings
