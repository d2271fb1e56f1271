"""Exit in order: a finished worker leaves no process group and no thread behind (issue 17 item 6: about 1 run in
25 aborted after finishing with 'terminate called without an active exception' and torchrun restarted it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_finished_workers_leave_no_process_group_or_thread(tmp_path, data_cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    runner = Path(__file__).with_name("teardown_runner.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
                           str(runner), str(tmp_path / "run"), data_cache], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    assert reports == [{"rank": 0, "pg": False, "threads": []}, {"rank": 1, "pg": False, "threads": []}], proc.stdout
    assert "terminate called" not in proc.stderr
