"""A checkpoint on disk: its name, its manifest (size and sha256 of every file), verification against it, and
finding the newest checkpoint that verifies. Writing and loading the state itself is in checkpoint.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

from gigafactory.errors import UserError
from gigafactory.parallel.distributed import all_gather_objects, barrier, get_rank, get_world_size, is_rank0

MANIFEST = "manifest.json"
_HASH_CHUNK = 8 << 20

LogEvent = Callable[..., None]  # log_event(event: str, **fields), e.g. EventLog.record


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def file_digest(path: Path) -> dict:
    """{"size": bytes, "sha256": hex} of one file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def own_shard_files(ckpt_dir: Path, rank: int) -> list[Path]:
    """The shard files DCP's FileSystemWriter wrote for `rank` (named `__{rank}_{i}.distcp`)."""
    return sorted(ckpt_dir.glob(f"__{rank}_*.distcp"))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(ckpt_dir: Path, known: dict[str, dict] | None = None) -> dict:
    """Hash every file in `ckpt_dir` (reusing digests in `known`) and write manifest.json; return the manifest."""
    known = dict(known or {})
    files = {}
    for p in sorted(ckpt_dir.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            files[p.name] = known.get(p.name) or file_digest(p)
    manifest = {"format": 1, "created": time.time(), "files": files}
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(ckpt_dir / MANIFEST)
    return manifest


def verify_checkpoint(ckpt_dir: Path, full: bool = True) -> list[str]:
    """Problems found in `ckpt_dir` against its manifest ([] = good). full=False checks sizes only.

    Under torch.distributed every rank must call it: the files are hashed in parallel (rank r hashes every
    world_size-th file) and the problems are shared, so all ranks return the same list."""
    ckpt_dir = Path(ckpt_dir)
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return _gather_problems([f"{MANIFEST} missing"] if is_rank0() else [])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _gather_problems([f"{MANIFEST} unreadable ({type(err).__name__})"] if is_rank0() else [])
    problems = []
    for i, (name, want) in enumerate(sorted(files.items())):
        if i % get_world_size() != get_rank():
            continue
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, manifest says {want['size']} (truncated?)")
        elif full and file_digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{name}: sha256 mismatch (corrupt)")
    return _gather_problems(problems)


def _gather_problems(mine: list[str]) -> list[str]:
    return sorted(p for part in all_gather_objects(mine) for p in part)


# ---- listing -----------------------------------------------------------------------------------------------------
def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories `step-N`, oldest first (unfinished `.tmp` and set-aside `.old` ones are ignored; a
    damaged one, e.g. missing DCP's `.metadata`, is listed so that verification can report it)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and "." not in p.name)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest checkpoint that has DCP metadata, unverified (see `usable_checkpoints`)."""
    found = [p for p in list_checkpoints(ckpt_root) if (p / ".metadata").is_file()]
    return found[-1] if found else None


def usable_checkpoints(ckpt_root: Path, log_event: LogEvent | None = None, full: bool = True, verify: bool = True):
    """Yield, newest first, the checkpoints whose files match their manifest. Each one skipped is reported through
    `log_event("checkpoint_corrupt", path=..., problems=[...])`; one without a manifest is yielded but reported as
    `checkpoint_unverified` (the caller falls back further if it then fails to load). Collective under
    torch.distributed: every rank must iterate alike."""
    for path in reversed(list_checkpoints(ckpt_root)):
        problems = verify_checkpoint(path, full=full) if verify else []
        if problems == [f"{MANIFEST} missing"]:
            if log_event:
                log_event("checkpoint_unverified", path=str(path), once=True)
            problems = []
        if not problems:
            yield path
            continue
        if log_event:
            log_event("checkpoint_corrupt", path=str(path), problems=problems[:10], once=True)
        else:
            warnings.warn(f"skipping corrupt checkpoint {path}: {'; '.join(problems[:3])}")


def latest_good_checkpoint(ckpt_root: Path, log_event: LogEvent | None = None, full: bool = True) -> Path | None:
    """The newest checkpoint that verifies (see `usable_checkpoints`), or None."""
    return next(usable_checkpoints(ckpt_root, log_event, full), None)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a checkpoints/ directory or a run directory (of a fault-tolerant run too: the
    newest checkpoint of any replica group, all of which hold the same weights); return one checkpoint."""
    p = Path(path).expanduser()
    if (p / ".metadata").is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    groups = [c for c in (latest_checkpoint(g / "checkpoints") for g in sorted(p.glob("group*")) if g.is_dir()) if c is not None]
    if groups:
        return max(groups, key=lambda c: c.name)  # step-NNNNNNNN names sort by step
    raise UserError(f"no checkpoint found at '{p}'; pass a run directory or a checkpoints/step-N directory written by `gigafactory train`")


def remove_stale(ckpt_root: Path) -> list[Path]:
    """Delete `.tmp`/`.old` leftovers of a crashed save (rank 0; call at start-up, before any save)."""
    removed = []
    if is_rank0() and Path(ckpt_root).is_dir():
        for p in Path(ckpt_root).glob("step-*.*"):
            if p.is_dir() and p.suffix in (".tmp", ".old"):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    barrier()
    return removed
