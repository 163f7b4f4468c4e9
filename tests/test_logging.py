"""Where gradwatch's log lines go: to the application's handlers once it has any, else to stderr.

Each case runs in a fresh interpreter, since what matters is the order of ``import gradwatch`` and
the application's own logging set-up. The lines are real: gradwatch's console sink logs a warning
finding (WARNING) and an info finding (INFO), as it does during a fit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

EMIT = """
from gradwatch.findings import Finding
from gradwatch.sinks.console import Console
Console().finding(Finding("dead_units", "warning", 3, 0, "net.0", "half the units are dead", advice="a"))
Console().finding(Finding("loss_plateau", "info", 9, 0, None, "the loss is flat", advice="b"))
"""
WARNING = "gradwatch: [warning] dead_units at step 3 in net.0: half the units are dead"
INFO = "gradwatch: [info] loss_plateau at step 9: the loss is flat"
APP_FORMAT = 'format="APP|%(name)s|%(levelname)s|%(message)s", stream=sys.stdout'


def _python(code: str) -> subprocess.CompletedProcess:
    script = "import logging, sys\n" + textwrap.dedent(code) + EMIT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize(
    "setup",
    [
        f"import gradwatch\nlogging.basicConfig({APP_FORMAT})",  # the application configures after import
        f"logging.basicConfig({APP_FORMAT})\nimport gradwatch",  # ... or before
    ],
    ids=["configured-after-import", "configured-before-import"],
)
def test_the_applications_handler_gets_each_line_once(setup):
    out = _python(setup)
    assert out.stdout.count(f"APP|gradwatch|WARNING|{WARNING}") == 1, out.stdout
    assert out.stdout.count(f"APP|gradwatch|INFO|{INFO}") == 1, out.stdout  # gradwatch's level is INFO
    assert "dead_units" not in out.stderr and "loss_plateau" not in out.stderr  # no second copy


def test_a_handler_on_the_gradwatch_logger_alone_gets_each_line_once():
    out = _python(
        """
        import gradwatch
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("APP|%(levelname)s|%(message)s"))
        logging.getLogger("gradwatch").addHandler(handler)
        """
    )
    assert out.stdout.count(f"APP|WARNING|{WARNING}") == 1, out.stdout
    assert "dead_units" not in out.stderr


def test_without_logging_set_up_lines_go_to_stderr_once():
    out = _python("import gradwatch\nprint(logging.getLogger('gradwatch').propagate)")
    lines = out.stderr.splitlines()
    assert lines.count(WARNING) == 1 and lines.count(INFO) == 1, out.stderr  # INFO too, as plain messages
    assert out.stdout == "True\n"  # nothing on stdout, and the logger propagates, as a library's should
