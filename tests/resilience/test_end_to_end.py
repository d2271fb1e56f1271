"""End-to-end fault drills: `gigafactory train --nproc 2` on CPU/gloo with --faults.* and --resilience.* flags.

These run against the integrated trainer and skip cleanly until JobConfig has the `faults` and `resilience`
sections. Each launch costs ~10-40 s on 2 cores, so they are marked `slow`-style by their runtime only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigafactory.config.job import JobConfig
from tests.conftest import TINY_MODEL

pytestmark = pytest.mark.skipif(not (hasattr(JobConfig(), "faults") and hasattr(JobConfig(), "resilience")),
                                reason="needs [faults] and [resilience] mounted in JobConfig (trainer integration)")

STEPS = 8


def flags(run_dir: Path, data_cache: str) -> list[str]:
    return [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"--data.cache_dir={data_cache}", "--data.seq_len=32", "--training.batch_size=4", f"--training.steps={STEPS}",
        "--training.eval_every=0", "--training.dtype=fp32", "--optimizer.warmup_steps=2", "--checkpoint.every=2",
        "--checkpoint.keep=3", f"--logging.run_dir={run_dir}", "--logging.log_every=1", "--logging.tensorboard=false",
        "--logging.progress=false", "--resilience.max_restarts=2", "--resilience.watchdog_timeout_s=15",
    ]


def train(run_dir: Path, data_cache: str, *extra: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    return subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "train", f"--nproc={nproc}", *flags(run_dir, data_cache), *extra],
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


def test_restart_resumes_from_host_memory_bitwise(tmp_path, data_cache_module, baseline):
    """Disk checkpoints only at the end, memory checkpoints every 2 steps: a rank killed at step 7 costs one step,
    not seven; the run equals the uninterrupted one bit for bit, and the memory copy is freed when it finishes."""
    memory = tmp_path / "shm"
    proc = train(tmp_path / "run", data_cache_module, "--faults.kill_rank=1", "--faults.kill_step=7", "--checkpoint.every=100",
                 "--checkpoint.memory_every=2", f"--checkpoint.memory_dir={memory}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path / "run") == baseline
    resumed = [(e["step"], e["source"]) for e in events(tmp_path / "run") if e["event"] == "resume"]
    assert resumed[0] == (6, "memory")  # (seen once under heavy load: a second restart after the end, from disk at 8)
    assert not any(memory.rglob("step-*"))


def test_hang_detected_and_recovered(tmp_path, data_cache_module, baseline):
    proc = train(tmp_path / "run", data_cache_module, "--faults.hang_rank=1", "--faults.hang_step=5", "--resilience.watchdog_timeout_s=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "run")
    hangs = [e for e in ev if e["event"] == "hang"]
    injected = next(e for e in ev if e["event"] == "fault_injected" and e["kind"] == "hang")
    assert hangs and min(h["time"] for h in hangs) - injected["time"] <= 30
    assert losses(tmp_path / "run") == baseline
    assert "failures: 1" in report(tmp_path / "run")


def test_transient_nan_is_rerun_and_leaves_no_trace(tmp_path, data_cache_module, baseline):
    """A NaN that a re-run of the same batch does not reproduce is a transient fault: the re-run's update is kept,
    so every loss equals the uninterrupted run bit for bit."""
    proc = train(tmp_path / "run", data_cache_module, "--faults.nan_step=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "run")
    assert [(e["event"], e["step"], e["reason"]) for e in ev if e["event"] in ("transient_fault", "nan")] == [("transient_fault", 5, "nan")]
    assert losses(tmp_path / "run") == baseline
    assert "transient" in proc.stderr  # printed on the console, not only in events.jsonl


def test_real_nan_is_skipped(tmp_path, data_cache_module):
    proc = train(tmp_path / "run", data_cache_module, "--faults.nan_step=5", "--faults.anomaly_repeats=2", "--resilience.on_nan=skip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    nan = [e for e in events(tmp_path / "run") if e["event"] == "nan"]
    assert len(nan) == 1 and nan[0]["action"] == "skip" and nan[0]["step"] == 5 and nan[0]["reproduced"]
    assert max(losses(tmp_path / "run")) == STEPS
    assert "nan" in report(tmp_path / "run")


SPIKE = ("--resilience.spike_zscore=50", "--resilience.spike_window=3", "--resilience.on_spike=rollback", "--faults.spike_step=5")


@pytest.mark.parametrize("async_save", ["false", "true"])  # async: the checkpointer must stay usable after a rollback
def test_real_spike_rolls_back_past_the_batch_and_recovers(tmp_path, data_cache_module, baseline, async_save):
    proc = train(tmp_path / "run", data_cache_module, *SPIKE, "--faults.anomaly_repeats=2", f"--resilience.async_checkpoint={async_save}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = events(tmp_path / "run")
    spikes = [e for e in ev if e["event"] == "spike"]
    rollbacks = [e for e in ev if e["event"] == "rollback"]
    assert [(e["step"], e["action"], e["reproduced"]) for e in spikes] == [(5, "rollback", True)]
    assert [(e["from_step"], e["to_step"], e["batches_skipped"]) for e in rollbacks] == [(5, 4, 1)]
    got = losses(tmp_path / "run")
    assert {s: got[s] for s in range(1, 5)} == {s: baseline[s] for s in range(1, 5)}  # before the spike: untouched
    assert max(got) == STEPS and got[5] != baseline[5]  # step 5 ran on the next batch, and training went on
    assert abs(got[STEPS] - baseline[STEPS]) < 0.05 * baseline[STEPS]
    assert "rolled back from step 5 to step 4" in proc.stderr


def test_spike_that_keeps_coming_back_stops_after_max_rollbacks(tmp_path, data_cache_module):
    proc = train(tmp_path / "run", data_cache_module, *SPIKE, "--faults.anomaly_repeats=100", "--resilience.max_rollbacks=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training stopped at step 5: already rolled back 1 time(s) at step 5"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert [e["attempt"] for e in events(tmp_path / "run") if e["event"] == "start"] == [0]  # never retried by torchrun


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


def test_async_save_is_committed_before_the_next_one(tmp_path, data_cache_module):
    """Async saves every 60 steps, a rank killed at step 100: the step-60 save committed in the background as soon as
    it was written, so the restart resumes at step 60 (it used to wait for the next save, and the job restarted at 0)."""
    proc = train(tmp_path / "run", data_cache_module, "--resilience.async_checkpoint=true", "--faults.kill_rank=1", "--faults.kill_step=100",
                 "--training.steps=120", "--checkpoint.every=60", "--logging.log_every=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert next(e for e in events(tmp_path / "run") if e["event"] == "restart")["resumed_step"] == 60


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_under_nproc_saves_exits_cleanly_and_resumes_bitwise(tmp_path, data_cache_module, baseline, sig):
    """Ctrl-C in the terminal or SIGTERM from a scheduler, sent to `gigafactory train --nproc 2`: the workers finish
    their step and save, torchrun ends without a traceback, the command exits 128+signal; run again, it resumes."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    cmd = [sys.executable, "-m", "gigafactory.cli.main", "train", "--nproc=2", *flags(run_dir, data_cache_module), "--checkpoint.every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    stopped = max(losses(run_dir))
    assert stopped < STEPS and [p.name for p in (run_dir / "checkpoints").glob("step-*")] == [f"step-{stopped:08d}"]
    again = train(run_dir, data_cache_module, "--checkpoint.every=0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(run_dir) == baseline
