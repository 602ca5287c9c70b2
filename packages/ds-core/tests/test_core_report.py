import subprocess
import sys


def test_ds_report_prints_every_section():
    out = subprocess.run([sys.executable, "-m", "ds_core.report"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for title in ("environment", "communication backends", "ds packages", "compiled ops", "compilers"):
        assert title in out.stdout
    assert "gloo" in out.stdout and "ds-core" in out.stdout
