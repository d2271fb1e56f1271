"""End-to-end fault drills: `gigafactory train --nproc 2` on CPU/gloo with --faults.* and --resilience.* flags.

These run against the integrated trainer and skip cleanly until JobConfig has the `faults` and `resilience`
sections. Each launch costs ~10-40 s on 2 cores, so they are marked `slow`-style by their runtime only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gigafactory.config.job import JobConfig
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.skipif(not (hasattr(JobConfig(), "faults") and hasattr(JobConfig(), "resilience")),
                                reason="needs [faults] and [resilience] mounted in JobConfig (trainer integration)")

STEPS = 8


def train(run_dir: Path, data_cache: str, *extra: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    flags = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"--data.cache_dir={data_cache}", "--data.seq_len=32", "--training.batch_size=4", f"--training.steps={STEPS}",
        "--training.eval_every=0", "--training.dtype=fp32", "--optimizer.warmup_steps=2", "--checkpoint.every=2",
        "--checkpoint.keep=3", f"--logging.run_dir={run_dir}", "--logging.log_every=1", "--logging.tensorboard=false",
        "--logging.progress=false", "--resilience.max_restarts=2", "--resilience.watchdog_timeout_s=15",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "train", f"--nproc={nproc}", *flags, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # the last run of a step wins
    return out


def events(run_dir: Path) -> list[dict]:
    from gigafactory.resilience.events import read_events

    return read_events(run_dir / "events.jsonl")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_cache_module):
    run_dir = tmp_path_factory.mktemp("e2e") / "baseline"
    proc = train(run_dir, data_cache_module)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(run_dir)


@pytest.fixture(scope="module")
def data_cache_module(tmp_path_factory):
    return str(tmp_path_factory.mktemp("e2e_data"))


def report(run_dir: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "report", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ETTR" in proc.stdout
    return proc.stdout


def test_sigkill_recovers_bitwise(tmp_path, data_cache_module, baseline):
    proc = train(tmp_path / "run", data_cache_module, "--faults.kill_rank=1", "--faults.kill_step=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "run") == baseline  # bit for bit: JSON floats round-trip exactly
    restarts = [e for e in events(tmp_path / "run") if e["event"] == "restart"]
    assert len(restarts) == 1 and restarts[0]["resumed_step"] == 4 and restarts[0]["steps_lost"] >= 0
    assert "failures: 1" in report(tmp_path / "run")


def test_hang_detected_and_recovered(tmp_path, data_cache_module, baseline):
    proc = train(tmp_path / "run", data_cache_module, "--faults.hang_rank=1", "--faults.hang_step=5", "--resilience.watchdog_timeout_s=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "run")
    hangs = [e for e in ev if e["event"] == "hang"]
    injected = next(e for e in ev if e["event"] == "fault_injected" and e["kind"] == "hang")
    assert hangs and min(h["time"] for h in hangs) - injected["time"] <= 30
    assert losses(tmp_path / "run") == baseline
    assert "failures: 1" in report(tmp_path / "run")


@pytest.mark.parametrize("action", ["skip", "rollback"])
def test_nan_handled_per_config(tmp_path, data_cache_module, action):
    proc = train(tmp_path / "run", data_cache_module, "--faults.nan_step=5", f"--resilience.on_nan={action}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nan = [e for e in events(tmp_path / "run") if e["event"] == "nan"]
    assert nan and nan[0]["action"] == action and nan[0]["step"] == 5
    assert max(losses(tmp_path / "run")) == STEPS
    assert "nan" in report(tmp_path / "run")


@pytest.mark.parametrize("mode", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_falls_back(tmp_path, data_cache_module, baseline, mode):
    proc = train(tmp_path / "run", data_cache_module, f"--faults.corrupt_latest={mode}", "--faults.corrupt_step=4",
                 "--faults.kill_rank=0", "--faults.kill_step=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "run")
    assert any(e["event"] == "checkpoint_corrupt" and e["path"].endswith("step-00000004") for e in ev)
    assert next(e for e in ev if e["event"] == "restart")["resumed_step"] == 2
    assert losses(tmp_path / "run") == baseline


def test_enospc_keeps_previous_and_training_continues(tmp_path, data_cache_module, baseline):
    proc = train(tmp_path / "run", data_cache_module, "--faults.fail_save_step=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(e["event"] == "checkpoint_failed" and e["step"] == 4 for e in events(tmp_path / "run"))
    from gigafactory.train.checkpoint_files import verify_checkpoint

    assert verify_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000002") == []
    assert losses(tmp_path / "run") == baseline
