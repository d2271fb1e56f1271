"""Checkpoint integrity with the real save/load functions on a tiny model + AdamW (single process)."""

from __future__ import annotations

import errno
import json
import resource
import signal
import subprocess
import time

import pytest
import torch
from torch import nn

from gigafactory.config.job import FaultConfig
from gigafactory.resilience import EventLog, FaultInjector, read_events
from gigafactory.resilience.faults import corrupt_checkpoint
from gigafactory.train import checkpoint as ckpt
from gigafactory.train import checkpoint_files as ckpt_files


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 16, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def save(root, step, model, opt, keep=3, **kw):
    return ckpt.save_checkpoint(root, step, model, opt, {"step": step, "loader": {"consumed": step * 8}}, {"config.toml": "x = 1\n"}, keep, **kw)


def load_into_fresh(path):
    model, opt = make(seed=99)
    state = ckpt.load_checkpoint(path, model, opt, {"step": 0, "loader": {"consumed": 0}}, verify=True)
    return model, state


def test_manifest_written_and_verifies(tmp_path):
    model, opt = make()
    train_steps(model, opt, 2)
    path = save(tmp_path, 2, model, opt)
    manifest = json.loads((path / ckpt_files.MANIFEST).read_text())
    assert ".metadata" in manifest["files"] and "config.toml" in manifest["files"]
    assert any(name.endswith(".distcp") for name in manifest["files"])
    assert (tmp_path / ckpt.LATEST).read_text().strip() == path.name
    assert ckpt_files.verify_checkpoint(path) == []
    loaded, state = load_into_fresh(path)
    assert state["step"] == 2 and state["loader"]["consumed"] == 16
    assert all(torch.equal(a, b) for a, b in zip(params(model), params(loaded)))


@pytest.mark.parametrize("mode", ["truncate", "flip"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, mode):
    model, opt = make()
    train_steps(model, opt, 1)
    good = save(tmp_path, 1, model, opt)
    want = params(model)
    train_steps(model, opt, 1)
    bad = save(tmp_path, 2, model, opt)
    corrupt_checkpoint(bad, mode)
    problems = ckpt_files.verify_checkpoint(bad)
    assert problems and ("truncated" in problems[0] if mode == "truncate" else "sha256" in problems[0])
    assert ckpt_files.verify_checkpoint(bad, full=False) == ([] if mode == "flip" else problems)
    events = EventLog(tmp_path / "events.jsonl")
    assert ckpt_files.latest_good_checkpoint(tmp_path, events) == good
    recs = read_events(tmp_path / "events.jsonl")
    assert [r["event"] for r in recs] == ["checkpoint_corrupt"] and recs[0]["path"] == str(bad)
    with pytest.raises(ckpt.CorruptCheckpointError):
        load_into_fresh(bad)  # nothing silently loads bad weights
    loaded, state = load_into_fresh(good)
    assert state["step"] == 1 and all(torch.equal(a, b) for a, b in zip(want, params(loaded)))


def test_enospc_during_save_keeps_previous(tmp_path, monkeypatch):
    model, opt = make()
    train_steps(model, opt, 1)
    good = save(tmp_path, 1, model, opt)
    want = params(model)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    train_steps(model, opt, 1)
    real_save = ckpt.dcp.save

    def full_disk(state, checkpoint_id):  # writes part of the shards, then the disk is full
        real_save(state, checkpoint_id=checkpoint_id)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.dcp, "save", full_disk)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        save(tmp_path, 2, model, opt)
    assert "ENOSPC" in str(info.value) and info.value.step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000001"]  # tmp removed
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert ckpt_files.latest_good_checkpoint(tmp_path) == good
    _, state = load_into_fresh(good)
    assert state["step"] == 1
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert save(tmp_path, 2, model, opt).name == "step-00000002"  # training goes on and the next save works
    assert all(torch.equal(a, b) for a, b in zip(want, params(load_into_fresh(good)[0])))


def test_injected_fail_save_and_corrupt_fire_once(tmp_path):
    model, opt = make()
    events = EventLog(tmp_path / "events.jsonl")
    inj = FaultInjector(FaultConfig(fail_save_step=2, corrupt_latest="flip", corrupt_step=3), rank=0, run_dir=tmp_path, events=events)
    root = tmp_path / "checkpoints"
    saver = ckpt.Checkpointer(root, keep=3, log_event=events, hooks=ckpt.CommitHooks(inj.before_save, inj.after_save))
    for step in (1, 2, 3):
        train_steps(model, opt, 1, seed=step)
        try:
            saver.save(step, model, opt, {"step": step}, {})
        except ckpt.CheckpointSaveError:
            pass
    failed = [r for r in read_events(tmp_path / "events.jsonl") if r["event"] == "checkpoint_failed"]
    assert [r["step"] for r in failed] == [2] and failed[0]["reason"].startswith("rank 0: disk full (ENOSPC")
    assert [p.name for p in ckpt_files.list_checkpoints(root)] == ["step-00000001", "step-00000003"]
    assert ckpt_files.latest_good_checkpoint(root, events).name == "step-00000001"
    kinds = [(r["event"], r.get("kind")) for r in read_events(tmp_path / "events.jsonl")]
    assert ("fault_injected", "fail_save") in kinds and ("fault_injected", "corrupt") in kinds and ("checkpoint_corrupt", None) in kinds
    inj2 = FaultInjector(FaultConfig(fail_save_step=2), rank=0, run_dir=tmp_path)
    inj2.before_save(2)  # marker file: a restarted job does not hit the same fault again


def test_async_save_then_finalize(tmp_path):
    model, opt = make()
    train_steps(model, opt, 2)
    want = params(model)
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=True)
    assert saver.save(2, model, opt, {"step": 2}, {"config.toml": "a = 1\n"}) is None
    assert saver.pending_step == 2
    train_steps(model, opt, 1)  # the step may change weights while the write is in flight
    assert not (tmp_path / "step-00000002").exists() or saver.done_locally()
    path = saver.finalize()
    assert path == tmp_path / "step-00000002" and ckpt_files.verify_checkpoint(path) == []
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    fresh, fopt = make(seed=5)
    state = ckpt.load_checkpoint(path, fresh, fopt, {"step": 0}, verify=True)
    assert state["step"] == 2 and all(torch.equal(a, b) for a, b in zip(want, params(fresh)))
    for step in (3, 4):  # keep=2 prunes; save() finalises the previous save itself
        saver.save(step, model, opt, {"step": step}, {})
    assert saver.close() == tmp_path / "step-00000004"
    assert [p.name for p in ckpt_files.list_checkpoints(tmp_path)] == ["step-00000003", "step-00000004"]


def test_async_failure_surfaces_at_finalize(tmp_path):
    model, opt = make()
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=True, hooks=ckpt.CommitHooks(FaultInjector(FaultConfig(fail_save_step=1), 0).before_save))
    saver.save(1, model, opt, {"step": 1}, {})
    with pytest.raises(ckpt.CheckpointSaveError):
        saver.finalize()
    assert not list(tmp_path.glob("step-*"))


def test_async_save_commits_as_soon_as_written(tmp_path):
    """A kill after an async save's write must find it committed, not waiting for the next save or the end."""
    model, opt = make()
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=True)
    assert saver.save(1, model, opt, {"step": 1}, {}) is None
    deadline = time.monotonic() + 30
    while not (tmp_path / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "latest").read_text().strip() == "step-00000001"  # finalize() was never called
    assert ckpt_files.verify_checkpoint(tmp_path / "step-00000001") == []
    assert saver.close() == tmp_path / "step-00000001"


def _fill_limited(limit_bytes: int):
    """Writes beyond `limit_bytes` fail (RLIMIT_FSIZE: a real short write deep inside DCP, like a full disk's)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, old_limit[1]))
    return lambda: (resource.setrlimit(resource.RLIMIT_FSIZE, old_limit), signal.signal(signal.SIGXFSZ, old_handler))


def test_real_write_failure_is_classified_and_previous_kept(tmp_path):
    model, opt = make()
    good = save(tmp_path, 1, model, opt)
    restore = _fill_limited(2048)  # the shard is ~10 KiB
    try:
        with pytest.raises(ckpt.CheckpointSaveError) as err:
            save(tmp_path, 2, model, opt)
    finally:
        restore()
    assert "file too large" in err.value.reason and "MiB free" in err.value.reason  # the probe names what DCP hid
    assert ckpt_files.list_checkpoints(tmp_path) == [good] and ckpt_files.verify_checkpoint(good) == []


def test_full_tmpfs_is_reported_as_disk_full(tmp_path):
    """A real full disk (a 256 KiB tmpfs): DCP's own error says 'unexpected pos'; the report must say 'disk full'."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); test_real_write_failure_is_classified covers the path")
    try:
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk, then free 8 KiB: enough to start a save, not to finish it
            with pytest.raises(OSError):
                while True:
                    f.write(b"x" * 4096)
        filler.write_bytes(b"x" * (filler.stat().st_size - 8192))
        model, opt = make()
        with pytest.raises(ckpt.CheckpointSaveError) as err:
            save(mount / "checkpoints", 1, model, opt)
        assert "disk full" in err.value.reason and not list((mount / "checkpoints").glob("step-*"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_stale_tmp_removed_and_ignored(tmp_path):
    model, opt = make()
    save(tmp_path, 1, model, opt)
    (tmp_path / "step-00000002.tmp").mkdir()
    (tmp_path / "step-00000002.tmp" / ".metadata").write_text("partial")
    assert ckpt_files.latest_checkpoint(tmp_path).name == "step-00000001"
    assert [p.name for p in ckpt_files.remove_stale(tmp_path)] == ["step-00000002.tmp"]


def test_async_reused_buffers_carry_new_values(tmp_path):
    model, opt = make()
    saver = ckpt.Checkpointer(tmp_path, keep=3, async_save=True)
    saver.save(1, model, opt, {"step": 1, "loader": {"consumed": 8}}, {})
    train_steps(model, opt, 1)
    want = params(model)
    saver.save(2, model, opt, {"step": 2, "loader": {"consumed": 16}}, {})
    train_steps(model, opt, 1)  # changes the live weights after staging; the checkpoint must hold the staged ones
    path = saver.close()
    fresh, fopt = make(seed=7)
    state = ckpt.load_checkpoint(path, fresh, fopt, {"step": 0, "loader": {"consumed": 0}}, verify=True)
    assert state == {"step": 2, "loader": {"consumed": 16}}
    assert all(torch.equal(a, b) for a, b in zip(want, params(fresh)))
