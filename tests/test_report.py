"""``gradwatch report`` on real run folders: the text report, the HTML report, and the HTML in Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import pytorch_lightning as pl
import tomllib
from chromium import Browser, find_chromium
from models import DigitsMLP, digits_loaders, trainer

import gradwatch
from gradwatch.cli import main
from gradwatch.findings import Action
from gradwatch.report import ReportError, load_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ActAt(pl.Callback):
    """One remedy action at ``step``, recorded through the monitor's public ``record_action``."""

    def __init__(self, mon, step):
        self.mon, self.step = mon, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            self.mon.monitor.record_action(Action("skip_step", self.step, "nonfinite", message="skipped"))


def _run(root, per_layer: bool) -> str:
    mon = gradwatch.HealthMonitor(every_n_steps=2, per_layer=per_layer, remedies="off", print_summary=False)
    t = trainer(root, [mon, ActAt(mon, 6)], max_steps=12, log_every_n_steps=2)
    t.fit(DigitsMLP(nan_at_step=6), *digits_loaders())
    return t.log_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("per_layer"), per_layer=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, timeout=120
    )


def test_text_report_of_a_real_run(run_dir):
    out = _cli("report", run_dir)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "verdict: CRITICAL (run finished, 12 optimizer steps, 1 epoch(s))" in text
    assert re.search(r"nonfinite\s+critical\s+6\s+2\s+net\.0", text)  # first step and count
    assert re.search(r"skip_step\s+6\s+1\s+nonfinite", text)  # the action
    assert re.search(r"loss \(train\)\s+min [\d.]+, max [\d.]+, last nan, non-finite at 6 step\(s\)", text)
    for layer in ("net.0", "net.2", "head"):  # grad-norm range and update ratio per layer
        assert re.search(rf"\n  {re.escape(layer)}\s+[\d.e+-]+\.\.[\d.e+-]+\s+\d+\s+\S+", text), layer
    assert re.search(r"activations per module.*\n.*dead units.*\n  net\.0 ", text)
    assert "not recorded" not in text


def test_report_says_when_per_layer_statistics_are_absent(tmp_path):
    run = _run(tmp_path, per_layer=False)
    assert main(["report", run, "--html", str(tmp_path / "r.html")]) == 0
    text = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", run], capture_output=True, text=True, timeout=120
    ).stdout
    assert "per-layer statistics: not recorded (the run used per_layer=False" in text
    assert "gradient norm (total)" in text
    page = (tmp_path / "r.html").read_text()
    assert "not recorded" in page and page.count("<img") == 3  # loss, totals, total update ratio


def test_html_report_is_one_self_contained_page(run_dir, tmp_path):
    path = tmp_path / "report.html"
    assert main(["report", run_dir, "--html", str(path)]) == 0
    page = path.read_text()
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt for alt, _ in images] == [
        "loss with findings and actions",
        "gradient norm heatmap",
        "activation statistics",
        "update ratios",
    ]
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for _, b64 in images)
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # nothing loaded from elsewhere
    assert "nonfinite" in page and "skip_step" in page
    assert "<h2>Findings (2)</h2>" in page and "more findings" not in page  # all listed
    assert "drawn as" not in page  # every finding and action drawn as its own line / triangle


def _many_events(run_dir, dest, n: int) -> tuple[list[dict], list[dict]]:
    """A copy of ``run_dir`` whose events file repeats the run's own findings and actions ``n`` times in
    all, two a step, and has no summary line (as if killed); returns (findings, actions) written."""
    shutil.copytree(run_dir, dest)
    path = dest / "gradwatch" / "events.jsonl"
    templates = [e for e in map(json.loads, path.read_text().splitlines()) if e["kind"] != "summary"]
    written = [{**templates[i % len(templates)], "step": i // 2} for i in range(n)]
    path.write_text("".join(json.dumps(e) + "\n" for e in written))
    return [e for e in written if e["kind"] == "finding"], [e for e in written if e["kind"] == "action"]


def test_html_report_of_20k_events_shows_all_of_them_in_numbers(run_dir, tmp_path):
    """20k events at 10k steps: the page lists 20 findings and says how many more there are, counts
    every one in the rules table, and says how the loss plot drew the lines it could not draw one by
    one. (How long it takes: benchmarks/report_speed.py; tests assert no times.)"""
    from gradwatch.report.marks import MAX_MARKS

    findings, actions = _many_events(run_dir, tmp_path / "run", 20_000)
    assert main(["report", str(tmp_path / "run"), "--html", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    listed = re.search(r"<h2>Findings \((\d+), first 20\)</h2><ol>(.*?)</ol>", page, re.S)
    assert listed and int(listed[1]) == len(findings) and listed[2].count("<li>") == 20
    assert f"{len(findings) - 20} more findings" in page
    counts = dict(re.findall(r"<tr><td>(\w+)</td><td>\w+</td><td>\d+</td><td>(\d+)</td>", page))
    assert {r: int(c) for r, c in counts.items()} == Counter(f["rule"] for f in findings)
    steps = {f["step"] for f in findings}
    lines, triangles = (
        r"(\d+) findings at (\d+) steps: drawn as (\d+) lines",
        r"(\d+) actions at (\d+) steps: drawn as (\d+) ",
    )
    note = re.search(lines + ".*?" + triangles, page)
    assert note, page[:3000]
    assert [int(x) for x in note.groups()[:2]] == [len(findings), len(steps)]
    assert [int(x) for x in note.groups()[3:5]] == [len(actions), len({a["step"] for a in actions})]
    assert 0 < int(note[3]) <= MAX_MARKS and 0 < int(note[6]) <= MAX_MARKS
    images = re.findall(r'<img alt="[^"]+" src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)


def test_report_errors_say_what_to_pass(tmp_path, run_dir, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for name in ("a", "b"):
        shutil.copytree(run_dir, tmp_path / "two" / name)
    with pytest.raises(ReportError, match=r"holds 2 runs; report one of them:\n  .*a\n  .*b"):
        load_run(tmp_path / "two")


def test_killed_run_without_summary_line(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    events = tmp_path / "run" / "gradwatch" / "events.jsonl"
    events.write_text("".join(events.read_text().splitlines(keepends=True)[:-1]))  # as if killed
    summary = load_run(tmp_path / "run").summary
    assert summary["verdict"] == "critical" and summary["status"].startswith("unknown (no summary line")
    assert summary["steps"] == 12


def test_console_script_and_light_imports():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["gradwatch"] == "gradwatch.cli:main"
    assert "matplotlib" in " ".join(project["optional-dependencies"]["report"])
    code = "import sys, gradwatch, gradwatch.cli, gradwatch.report; assert 'matplotlib' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_report_demo_example_runs_and_reports(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "report_demo.py"),
            "--out",
            str(tmp_path),
            "--steps",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = _cli("report", str(tmp_path / "version_0"))
    assert report.returncode == 0 and "verdict: HEALTHY" in report.stdout


CHROMIUM = find_chromium()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (.ci/run installs Debian's chromium; or: apt-get install chromium)",
)
def test_html_report_renders_in_headless_chromium(run_dir, tmp_path):
    path = tmp_path / "report.html"
    assert main(["report", run_dir, "--html", str(path)]) == 0
    browser = Browser(CHROMIUM)
    try:
        session = browser.open(path.as_uri())
        images = browser.evaluate(
            session, "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
        )
        title = browser.evaluate(session, "document.title")
        errors = browser.errors()
    finally:
        browser.close()
    assert len(images) == 4 and all(complete and width > 0 for _, complete, width in images), images
    assert title.startswith("gradwatch report")
    assert errors == []


def test_report_reads_what_it_can_and_says_what_it_skipped(tmp_path):
    """A half-written last line, an invalid line, NUL and non-UTF-8 bytes, an unknown severity and a
    summary without ``rules``: ``gradwatch report`` prints the report (no traceback) and names the
    lines it skipped."""
    import subprocess
    import sys

    good = {
        "kind": "finding",
        "time": 1.0,
        "rule": "nonfinite",
        "severity": "critical",
        "step": 3,
        "epoch": 0,
        "layer": None,
        "message": "the loss is nan",
        "evidence": {},
        "advice": "a",
    }
    lines = [
        json.dumps(good).encode(),
        b"this is not json",
        json.dumps({**good, "severity": "fatal"}).encode(),
        b'{"kind": "finding", "rule": "nonfinite", "sev\x00\x00',
        b"\xff\xfe not utf-8",
        json.dumps({"kind": "summary", "status": "finished"}).encode(),
        json.dumps(good)[:40].encode(),  # the half-written last line of a killed run
    ]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines))
    out = subprocess.run(
        [sys.executable, "-m", "gradwatch", "report", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "skipped 5 unreadable line(s)" in out.stdout, out.stdout
    assert "nonfinite" in out.stdout and "CRITICAL" in out.stdout.upper()
