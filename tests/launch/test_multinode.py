"""Multi-node, for real, on one machine: the generated sbatch script starts two torchrun agents (`--nnodes 2`,
c10d rendezvous on 127.0.0.1, one gloo worker each) through a stub srun, and the job survives what kills real
multi-node jobs, with every per-step loss bitwise equal to an uninterrupted run.

Each injected event stands for a real one:
1. SIGKILL of node 1's worker: a rank dying on one node (GPU Xid error, OOM kill, segfault). Both agents restart
   their workers from the newest checkpoint, spending one of torchrun's --max-restarts; no agent is relaunched.
2. SIGKILL of node 1's agent and worker together: the node is lost (power, kernel panic). Node 0's rank sees its
   peer vanish; srun's --kill-on-bad-exit ends the step and the job fails; `#SBATCH --requeue` makes Slurm requeue
   it under the same job id, so the test runs the script again (same SLURM_JOB_ID, so the same rendezvous id) and
   both agents come back and resume.
3. USR1 to the batch shell: the time limit's warning (`#SBATCH --signal=B:USR1@...`). The script sends SIGTERM to
   every rank, the trainer saves and exits within resilience.term_grace_s, the script calls `scontrol requeue`, and
   the requeued job (run again here) finishes from that checkpoint.

Relaunching only the lost agent into the surviving agent's rendezvous (what a Kubernetes pod restart does) is not
drilled: with torch 2.13 the surviving rank-0 agent does not republish the worker store address for the new round,
and the rejoining agent waits 60 s and fails (docs/scale-out.md, section 5).
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigafactory.cli.main import main
from tests.conftest import TINY_MODEL
from tests.launch import slurm_stub

STEPS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_corpus(path: Path) -> Path:
    """60 short documents from the shipped corpus: the tokenizer and shards prepare in about a second."""
    corpus = next(Path(__file__).resolve().parents[2].glob("gigafactory/data/corpus/*.jsonl.gz"))
    with gzip.open(corpus, "rt") as f:
        docs = [json.loads(line)["text"][:400] for line in itertools.islice(f, 60)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def write_job(tmp_path: Path, run_dir: Path, capsys) -> Path:
    """`gigafactory launch slurm --nodes 2 --gpus-per-node 1` for a tiny CPU job; the script file."""
    inputs = small_corpus(tmp_path / "small.jsonl")
    flags = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"--data.inputs={inputs}", f"--data.cache_dir={tmp_path / 'cache'}", "--data.seq_len=32", "--training.batch_size=4",
        f"--training.steps={STEPS}", "--training.eval_every=0", "--training.dtype=fp32", "--training.device=cpu",
        "--optimizer.warmup_steps=2", "--checkpoint.every=2", "--checkpoint.keep=3", f"--logging.run_dir={run_dir}",
        "--logging.log_every=1", "--logging.tensorboard=false", "--logging.progress=false",
        "--resilience.watchdog_timeout_s=30", "--resilience.term_grace_s=30",
    ]
    script = tmp_path / f"{run_dir.name}.sbatch"
    rc = main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "2", "--port", str(free_port()),
               "--name", "drill", "--time", "10", "--out", str(script), "--", *flags])
    assert rc == 0, capsys.readouterr().err
    return script


class Job:
    """One submission of the script under the stub Slurm (a requeue is a new submission with the same job id)."""

    def __init__(self, script: Path, state: Path, restart_count: int = 0):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
        env.update(slurm_stub.install(state.parent / "bin", state, hosts="127.0.0.1,127.0.0.1"), PYTHON=sys.executable, SLURM_JOB_ID="4242",
                   SLURM_JOB_NODELIST="localhost", SLURM_RESTART_COUNT=str(restart_count))
        self.state = state
        self.log = open(state / f"batch{restart_count}.log", "w")
        self.proc = subprocess.Popen(["bash", str(script)], env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=script.parent, start_new_session=True)

    def node_agent(self, node: int) -> int:
        return int((self.state / f"node{node}.pid").read_text())

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:  # the stub srun ends its step on SIGTERM forwarding; make sure
            for pid in slurm_stub.descendants(self.proc.pid):
                slurm_stub.kill_tree(pid)
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def why(self) -> str:
        logs = sorted(self.state.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # the last run of a step wins
    return out


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = max(losses(run_dir), default=0)
        if done >= step:
            return done
        assert job.proc.poll() is None, f"job ended before step {step}\n{job.why()}"
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s\n{job.why()}")


def worker_of(agent: int) -> int:
    return next(p for p in slurm_stub.descendants(agent) if b"gigafactory.cli.main" in Path(f"/proc/{p}/cmdline").read_bytes())


@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and PR_SET_CHILD_SUBREAPER")
def test_two_node_job_survives_rank_crash_node_loss_and_time_limit(tmp_path, capsys):
    base_dir, run_dir = tmp_path / "baseline", tmp_path / "drill"
    base_state, state = tmp_path / "slurm-base" / "state", tmp_path / "slurm" / "state"
    base_state.mkdir(parents=True)
    state.mkdir(parents=True)

    job = Job(write_job(tmp_path, base_dir, capsys), base_state)
    assert job.wait() == 0, job.why()
    baseline = losses(base_dir)
    assert sorted(baseline) == list(range(1, STEPS + 1))

    script = write_job(tmp_path, run_dir, capsys)
    job = Job(script, state)
    try:
        # 1. a rank dies on node 1: torchrun restarts both nodes' workers
        seen = wait_for_step(job, run_dir, 3)
        os.killpg(worker_of(job.node_agent(1)), signal.SIGKILL)
        # 2. node 1 is lost after the restart made progress: the step fails, Slurm requeues the job
        seen = wait_for_step(job, run_dir, seen + 3)
        slurm_stub.kill_tree(job.node_agent(1))
        assert job.wait() != 0, job.why()
    finally:
        job.stop()
    job = Job(script, state, restart_count=1)
    try:
        # 3. the time limit's warning: SIGTERM to every rank, save, requeue
        wait_for_step(job, run_dir, seen + 3)
        job.proc.send_signal(signal.SIGUSR1)
        assert job.wait() == 0, job.why()
    finally:
        job.stop()
    assert (state / "scontrol.log").read_text() == "requeue 4242\n", job.why()
    assert max(losses(run_dir)) < STEPS, "the time-limit stop came too late to test anything"
    job = Job(script, state, restart_count=2)
    assert job.wait() == 0, job.why()

    assert losses(run_dir) == baseline  # bit for bit: JSON floats round-trip exactly
    reruns = len((run_dir / "metrics.jsonl").read_text().splitlines()) - STEPS
    assert reruns > 0  # steps after the last checkpoint really were run again
