"""The examples run as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gradwatch.sinks.events import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_shows_a_healthy_and_a_faulty_run(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--epochs", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "gradwatch health summary: HEALTHY" in text
    assert "gradwatch health summary: CRITICAL" in text
    assert "nonfinite at step" in text
    rows = {
        line[:24].strip(): line[24:].split()
        for line in out.stdout.splitlines()
        if line.startswith(("healthy ", "faulty,"))
    }
    off, auto = float(rows["faulty, remedies off"][0]), float(rows["faulty, remedies auto"][0])
    assert off < 0.2 < 0.5 < auto  # remedies off ends with NaN weights; auto ends with a working model
    events = tmp_path / "faulty_auto" / "version_0" / "gradwatch" / "events.jsonl"
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert "finding" in kinds and "action" in kinds and kinds[-1] == "summary"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "healthy" / "version_0"))


def _run_example(name: str, *args: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(cwd),
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_plain_loop_example_rolls_the_nan_step_back_and_clips_the_spike(tmp_path):
    text = _run_example("plain_loop.py", "--epochs", "2", "--out", str(tmp_path), cwd=tmp_path)
    assert "findings: [('nonfinite', 15)" in text and "('gradient_spike', 35)" in text
    assert "actions: [('rollback', 15)" in text
    events = [json.loads(line) for line in (tmp_path / "gradwatch" / "events.jsonl").open()]
    assert any(e["kind"] == "action" and 35 in e.get("detail", {}).get("steps", []) for e in events)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


def test_fabric_example_under_ddp_on_two_cpu_processes(tmp_path):
    """Fabric DDP (gloo, 2 processes): every rank rolls the same step back and ends with finite weights."""
    text = _run_example(
        "fabric_loop.py", "--devices", "2", "--epochs", "3", "--out", str(tmp_path), cwd=tmp_path
    )
    (summary,) = [e for e in read_events(tmp_path / "gradwatch" / "events.jsonl") if e["kind"] == "summary"]
    assert (
        summary["setup"]["world_size"] == 2 and summary["setup"]["loop"] == "fabric"
    )  # the setup line is DEBUG
    assert "findings: [('nonfinite', 15)" in text and "('gradient_spike', 35)" in text
    assert "actions: [('rollback', 15)" in text
    assert "rank 0: weights finite True" in text and "rank 1: weights finite True" in text
    snaps = sorted(line.split(": ", 1)[1] for line in text.splitlines() if ": snapshots at steps" in line)
    assert len(snaps) == 2 and snaps[0] == snaps[1], snaps  # both ranks could roll back to the same state
    assert (tmp_path / "gradwatch" / "events.jsonl").exists()
