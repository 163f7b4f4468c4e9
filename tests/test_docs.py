"""The docs say what the code does: generated reference pages are current; README commands exist."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rules_and_remedies_docs_are_generated_from_the_code():
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "docs", "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def test_readme_links_point_at_files():
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for link in re.findall(r"\]\(((?:docs|examples|benchmarks)/[^)#]+)", text):
        assert os.path.exists(os.path.join(ROOT, link)), link
