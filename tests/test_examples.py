"""The examples run as users run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
