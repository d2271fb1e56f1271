"""`plan` and `simulate` answer without importing torch, and `python -m gigafactory` is the CLI."""

import json
import subprocess
import sys


def _imported(stderr: str) -> set[str]:
    """Top-level package names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_python_m_gigafactory_plan_never_imports_torch():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gigafactory", "plan", "--model", "grok-1b-moe", "--gpus", "64",
         "--gpu", "h100", "--tokens", "1e10", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)[0]["gpus"] == 64
    imported = _imported(out.stderr)
    assert "gigafactory" in imported and "torch" not in imported


def test_simulate_parser_and_engine_never_import_torch():
    code = ("import sys\nfrom gigafactory.cli.main import build_parser\nbuild_parser(['simulate', '--help'])\n"
            "import gigafactory.simulate.runner, gigafactory.cli.simulate, gigafactory.models\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
