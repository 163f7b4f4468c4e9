"""``import gradwatch`` stays light: Lightning and torch load only when the monitor is used."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, gradwatch\n"
        "heavy = [m for m in ('torch', 'pytorch_lightning', 'lightning', 'tensorboard') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "gradwatch.HealthMonitor\n"
        "assert 'pytorch_lightning' in sys.modules\n"
        "print(sorted(gradwatch.RULES)[:2], gradwatch.Severity.CRITICAL == 'critical')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['dead_units', 'divergence'] True"
