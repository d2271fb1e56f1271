"""Training: exact resume, checkpoint/model mismatch, clean Ctrl-C, and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigafactory.errors import UserError
from gigafactory.train.trainer import Trainer


def step_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_resume_is_bitwise_identical(tiny_job, tmp_path):
    def job(run):
        return tiny_job(training__steps=8, training__grad_accum_steps=2, logging__run_dir=str(tmp_path / run))

    Trainer(job("straight")).train()
    Trainer(job("halves")).train(stop_at=4)  # saves step 4 and ends, as a killed process would
    Trainer(job("halves")).train()  # a new process resumes from step 4
    a, b = step_losses(tmp_path / "straight"), step_losses(tmp_path / "halves")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert all(a[s] == b[s] for s in a), (a, b)  # exact float equality, not a tolerance


def test_training_lowers_the_eval_loss_and_keeps_k_checkpoints(tiny_job):
    cfg = tiny_job(training__steps=16, training__eval_every=16, checkpoint__every=4, checkpoint__keep=2, optimizer__lr=1e-2)
    summary = Trainer(cfg).train()
    (_, first), (_, last) = summary["eval"][0], summary["eval"][-1]
    assert last < first * 0.9
    ckpts = sorted(p.name for p in (Path(cfg.logging.run_dir) / "checkpoints").glob("step-*"))
    assert ckpts == ["step-00000012", "step-00000016"]
    assert (Path(cfg.logging.run_dir) / "checkpoints" / "latest").read_text().strip() == "step-00000016"


def test_resuming_with_another_model_shape_is_refused(tiny_job):
    Trainer(tiny_job(training__steps=2)).train()
    with pytest.raises(UserError, match="different model shape.*model.d_model"):
        Trainer(tiny_job(training__steps=4, model__d_model=32)).train()


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gigafactory.cli.main", *args], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--model.n_layer", "2"], "did you mean --model.n_layers"),
        (["train", "--training.steps", "x"], "expects int"),
        (["train", "--model.n_experts", "1"], "model.top_k=2 exceeds model.n_experts=1"),
        (["train", "--model.top_k", "9"], "top_k=9 exceeds"),
        (["train", "--data.inputs", "/no/such/file.txt"], "not found"),
        (["train", "--model.attn_impl", "flex", "--training.device", "cpu"], "attn_impl=flex cannot train on CPU"),
        (["generate", "--checkpoint", "/no/such/run", "--prompt", "x"], "no checkpoint found"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(args, message, data_cache, tmp_path):
    result = cli(*args, "--data.cache_dir" if args[0] == "train" else "--seed", data_cache if args[0] == "train" else "0", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_saves_a_checkpoint_and_exits_cleanly(tiny_job, tmp_path, data_cache, sig):
    """Ctrl-C (SIGINT) and what Slurm/Kubernetes send (SIGTERM): finish the step, save, exit 128+signal, one line."""
    run_dir = tmp_path / "interrupted"
    flags = ["--model.vocab_size", "512", "--model.d_model", "64", "--model.n_layers", "2", "--model.max_seq_len", "64",
             "--data.seq_len", "32", "--data.cache_dir", data_cache, "--training.batch_size", "4", "--training.steps", "100000",
             "--training.eval_every", "0", "--logging.run_dir", str(run_dir), "--logging.progress", "false", "--logging.tensorboard", "false",
             "--checkpoint.every", "0", "--logging.log_every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "gigafactory.cli.main", "train", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text().count("\n") >= 3):
        time.sleep(0.2)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"{sig.name} received" in err
    saved = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and f"{sig.name}: stopped after step" in out
    assert int(saved[0].name.split("-")[1]) == max(step_losses(run_dir))


@pytest.mark.parametrize("device_name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                               ("NVIDIA GB200", None), ("Some Future GPU", 0.0)])
def test_mfu_peak_comes_from_the_planner_catalog(device_name, peak, monkeypatch):
    import torch

    from gigafactory.plan.hardware import load_catalog
    from gigafactory.train.metrics import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    expected = load_catalog().gpus["gb200"].bf16_tflops if peak is None else peak  # gb200, not b200
    assert peak_tflops(torch.device("cuda"), 0.0) == expected
    assert peak_tflops(torch.device("cuda"), 123.0) == 123.0  # logging.peak_tflops wins
