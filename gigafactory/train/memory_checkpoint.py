"""Checkpoints in host memory (a tmpfs such as /dev/shm), between the durable ones on disk (after Gemini, SOSP'23).

A save to host memory costs a memory copy, so it can run every few steps; it survives the training processes (a
crash, a hang killed by the watchdog, a lighthouse loss that restarts every replica group) but not the machine.
A restart then loads the newest of: its disk checkpoints, its own memory checkpoint, and (under fault tolerance)
the memory checkpoints its peer groups keep on the same host. Live peers come first: a group whose peers are
running heals from them through torchft and reads nothing. Mirroring a group's memory copy to another host is not
built: across hosts, the disk checkpoint stays the last resort.

Layout: MEMORY_DIR/<hash of the run directory>/[groupK/]step-NNNNNNNN (the newest one kept); removed when the run
finishes, since tmpfs holds RAM.
"""

from __future__ import annotations

import hashlib
import heapq
import shutil
from pathlib import Path

from gigafactory.train import checkpoint as ckpt
from gigafactory.train.checkpoint_files import remove_stale, usable_checkpoints


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def _keyed(source, rank: int):
    """(sort key, path) for heapq.merge: newest step first, then the source's rank."""
    for path in source:
        yield (-_step(path), rank), path


class MemoryCheckpoints:
    def __init__(self, memory_dir: str, every: int, run_dir: Path, group: str | None, log_event):
        base = Path(memory_dir).expanduser() / hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.base, self.every, self.grouped = base, every, group is not None
        self.root = base / group if group else base
        self.checkpointer = ckpt.Checkpointer(self.root, keep=1, log_event=log_event)

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def roots(self) -> list[Path]:
        """This group's memory root first, then its peers' on this host."""
        peers = sorted(p for p in self.base.glob("group*") if p.is_dir() and p != self.root) if self.grouped else []
        return [self.root, *peers]

    def candidates(self, disk_root: Path, log_event, full: bool, verify: bool):
        """Usable checkpoints from disk and host memory, newest step first (memory before disk at the same step)."""
        for root in self.roots():
            remove_stale(root)
        sources = [usable_checkpoints(root, log_event, full=full, verify=verify) for root in self.roots()]
        sources.append(usable_checkpoints(disk_root, log_event, full=full, verify=verify))
        return (path for _, path in heapq.merge(*[_keyed(source, i) for i, source in enumerate(sources)]))

    def is_memory(self, path: Path) -> bool:
        return self.base in Path(path).parents

    def remove(self) -> None:
        """Free the host memory (the run finished and its final checkpoint is on disk)."""
        self.checkpointer.close()
        shutil.rmtree(self.root, ignore_errors=True)
        if self.grouped and not any(self.base.glob("group*/step-*")):
            shutil.rmtree(self.base, ignore_errors=True)
