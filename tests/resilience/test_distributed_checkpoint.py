"""Checkpoint commit protocol across 2 gloo processes: sync, async, and a disk-full error on one rank only."""

from __future__ import annotations

import errno
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    from gigafactory.train import checkpoint as ckpt
    from gigafactory.train import checkpoint_files as ckpt_files

    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    results = []
    path = ckpt.save_checkpoint(root, 1, model, opt, {"step": 1}, {"config.toml": "a = 1\n"}, keep=3)
    results.append(path.name)
    real_write = FileSystemWriter.write_data

    def disk_full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 1:  # only one rank's disk fills up
        FileSystemWriter.write_data = disk_full
    try:
        ckpt.save_checkpoint(root, 2, model, opt, {"step": 2}, {}, keep=3)
        results.append("saved")
    except ckpt.CheckpointSaveError as err:
        results.append(f"failed:{err.step}:{err.reason}")
    FileSystemWriter.write_data = real_write
    saver = ckpt.Checkpointer(root, keep=3, async_save=True)
    saver.save(3, model, opt, {"step": 3}, {})
    results.append(saver.close().name)
    good = ckpt_files.latest_good_checkpoint(root)
    state = ckpt.load_checkpoint(good, model, opt, {"step": 0}, verify=True)
    results.append(int(state["step"]))
    with open(f"{out}.{rank}", "w") as f:
        f.write(repr(results))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_commit_protocol(tmp_path):
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    mp.start_processes(_worker, args=(2, _free_port(), root, out), nprocs=2, start_method="spawn", join=True)
    for rank in (0, 1):
        saved, failed, *rest = eval((tmp_path / f"out.{rank}").read_text())
        assert [saved, *rest] == ["step-00000001", "step-00000003", 3]
        assert failed.startswith("failed:2:rank 1: disk full (ENOSPC: No space left on device;") and "rank 0" not in failed
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000001", "step-00000003"]
