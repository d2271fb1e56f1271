"""Straggler hunting: a rank slowed mid-run by the fault injector is named within a few steps, nothing is named
before it turns slow, and policy=exclude writes its host where `launch --exclude` reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from gigafactory.launch.exclude import read_exclude
from gigafactory.resilience.events import read_events
from gigafactory.resilience.stragglers import add_bad_nodes, straggler_report
from tests.conftest import TINY_MODEL

EVERY, SLOW_FROM, STEPS = 3, 7, 9


def test_bad_nodes_file_merges_and_is_what_launch_exclude_reads(tmp_path):
    path = tmp_path / "bad_nodes.json"
    add_bad_nodes(path, {"node-a": "rank 1 slow"})
    assert add_bad_nodes(path, {"node-b": "rank 5 slow", "node-a": "again"}) == ["node-a", "node-b"]
    assert read_exclude(str(path), lambda **_: None) == ["node-a", "node-b"]
    assert json.loads(path.read_text())["why"]["node-a"] == "again"
    rep = straggler_report([0.1, 0.11, 0.35, 0.1], ratio=1.5)
    assert rep["stragglers"] == [2] and rep["slowest"][0][0] == 2


def test_slow_rank_is_named_within_one_window_and_not_before(tmp_path, data_cache):
    """3 CPU ranks; rank 1 sleeps 0.4 s before every step from step 7: the checks at steps 3 and 6 name nobody (a
    clean run), the check at step 9 names rank 1 (events, console) and policy=exclude lists its host."""
    run_dir = tmp_path / "run"
    flags = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"--data.cache_dir={data_cache}", "--data.seq_len=32", "--training.batch_size=2", f"--training.steps={STEPS}",
        "--training.eval_every=0", "--training.dtype=fp32", "--checkpoint.every=0", f"--logging.run_dir={run_dir}",
        "--logging.tensorboard=false", "--logging.progress=false", "--training.threads=1",
        f"--resilience.straggler_every={EVERY}", "--resilience.straggler_ratio=1.5", "--resilience.straggler_policy=exclude",
        "--faults.delay_rank=1", "--faults.delay_s=0.4", f"--faults.delay_from_step={SLOW_FROM}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env["GIGAFACTORY_NODE_NAME"] = "drill-node"
    proc = subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "train", "--nproc=3", *flags],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_events(run_dir / "events.jsonl")
    named = [e for e in events if e["event"] == "straggler"]
    assert named, [e for e in events if e["event"] == "stragglers"]
    assert all(e["step"] > SLOW_FROM for e in named), named  # no false positive while every rank was healthy
    first = named[0]
    assert first["straggler_rank"] == 1 and first["step"] == SLOW_FROM - 1 + EVERY - (SLOW_FROM - 1) % EVERY
    assert first["judged"] == "compute" and first["x_median"] > 1.5 and first["host"] == "drill-node"
    assert "straggler at step 9: rank 1 on drill-node" in proc.stderr
    assert json.loads((run_dir / "bad_nodes.json").read_text())["bad_nodes"] == ["drill-node"]
