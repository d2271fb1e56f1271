"""The trainer's edges (issue 17): damaged checkpoints, a failed final save, bad run directories and flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gigafactory.errors import UserError
from gigafactory.resilience import read_events
from gigafactory.resilience.faults import corrupt_checkpoint
from gigafactory.train.trainer import Trainer
from tests.conftest import TINY_MODEL
from tests.train.test_trainer import step_losses


@pytest.fixture
def saved_run(tiny_job, tmp_path):
    """A run with checkpoints at steps 2 and 4 (of 6), and the losses of its uninterrupted twin."""
    straight = tiny_job(logging__run_dir=str(tmp_path / "straight"), checkpoint__every=2, checkpoint__keep=3)
    Trainer(straight).train()
    cfg = tiny_job(checkpoint__every=2, checkpoint__keep=3)
    Trainer(cfg).train(stop_at=4)
    root = Path(cfg.logging.run_dir) / "checkpoints"
    assert [p.name for p in sorted(root.glob("step-*"))] == ["step-00000002", "step-00000004"]
    return cfg, root, step_losses(tmp_path / "straight")


def _resume(cfg, capfd):
    Trainer(cfg).train()
    events = read_events(Path(cfg.logging.run_dir) / "events.jsonl")
    return [e for e in events if e["event"] in ("checkpoint_corrupt", "checkpoint_unverified")], capfd.readouterr().err


def test_unloadable_checkpoint_without_manifest_falls_back(saved_run, capfd):
    cfg, root, straight = saved_run
    (root / "step-00000004" / "manifest.json").unlink()
    corrupt_checkpoint(root / "step-00000004", "truncate")
    skipped, console = _resume(cfg, capfd)
    assert [(Path(e["path"]).name, e["event"]) for e in skipped] == [("step-00000004", "checkpoint_unverified"), ("step-00000004", "checkpoint_corrupt")]
    assert "load failed" in skipped[-1]["problems"][0]
    assert "checkpoint " in console and "step-00000004 is unusable" in console  # on the console, not only in events.jsonl
    assert step_losses(cfg.logging.run_dir) == straight  # resumed from step 2 and replayed 3..6 exactly


def test_missing_dcp_metadata_is_reported_and_skipped(saved_run, capfd):
    cfg, root, straight = saved_run
    (root / "step-00000004" / ".metadata").unlink()
    skipped, console = _resume(cfg, capfd)
    assert [(Path(e["path"]).name, e["event"]) for e in skipped] == [("step-00000004", "checkpoint_corrupt")]
    assert ".metadata: missing" in skipped[0]["problems"][0] and "step-00000004 is unusable" in console
    assert step_losses(cfg.logging.run_dir) == straight


def test_no_usable_checkpoint_stops_unless_told_to_start_over(saved_run):
    cfg, root, _ = saved_run
    for ckpt in root.glob("step-*"):
        corrupt_checkpoint(ckpt, "flip")
    with pytest.raises(UserError, match=r"none of the 2 checkpoint\(s\) .* is usable.*--checkpoint.resume never"):
        Trainer(cfg).train()
    cfg.checkpoint.resume = "never"
    assert Trainer(cfg).train()["start_step"] == 0


def test_failed_final_save_is_an_error_not_success(tiny_job):
    cfg = tiny_job(checkpoint__every=2, faults__fail_save_step=6)
    with pytest.raises(UserError, match=r"final checkpoint \(step 6\) could not be saved: rank 0: disk full \(ENOSPC.*newest checkpoint is step-00000004"):
        Trainer(cfg).train()


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gigafactory.cli.main", "train", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def tiny_flags(data_cache: str, run_dir: str) -> list[str]:
    return [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        f"--data.cache_dir={data_cache}", "--data.seq_len=32", "--training.batch_size=4", "--training.steps=2",
        "--training.eval_every=0", "--logging.tensorboard=false", "--logging.progress=false", f"--logging.run_dir={run_dir}"]


def _one_line(result, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip() and not set(line) <= {"*"} and "OMP_NUM_THREADS" not in line]
    assert "Traceback" not in result.stderr and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


@pytest.mark.parametrize("nproc", [1, 2])
def test_bad_run_dirs_and_flags_are_one_line_before_any_process(nproc, data_cache, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for run_dir, message in [(a_file, "is a file, not a directory"), (a_file / "run", "lies under a file")]:
        _one_line(cli(f"--nproc={nproc}", *tiny_flags(data_cache, str(run_dir)), cwd=tmp_path), message)
    _one_line(cli(f"--nproc={nproc}", *tiny_flags(data_cache, str(tmp_path / "r")), "--optimizer.lr=inf", cwd=tmp_path),
              "'optimizer.lr' must be a finite number")
    _one_line(cli(f"--nproc={nproc}", *tiny_flags(data_cache, str(tmp_path / "r")), "--training.threads=-3", cwd=tmp_path),
              "training.threads=-3 must be >= 0")


def test_read_only_run_dir_is_one_line(data_cache, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root); the run-dir checks above cover the code path")
    try:
        _one_line(cli(*tiny_flags(data_cache, str(ro / "run")), cwd=tmp_path), "is on a read-only filesystem")
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def test_bad_data_under_nproc_is_one_line_and_never_retried(data_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    run_dir = tmp_path / "run"
    result = cli("--nproc=2", *tiny_flags(str(tmp_path / "fresh_cache"), str(run_dir)), f"--data.inputs={bad}", cwd=tmp_path)
    _one_line(result, "bad.jsonl:2 is not valid JSON")
    assert "restart" not in result.stderr.lower()
