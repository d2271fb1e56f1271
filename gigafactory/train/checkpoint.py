"""Distributed checkpoints (torch.distributed.checkpoint) written atomically, verified, with the newest K kept.

A checkpoint is a directory `step-NNNNNNNN/` holding the DCP shards of the model and optimizer, a `train_state`
entry (step, data loader position), copies of config.toml and tokenizer.json so it is self-contained, and
`manifest.json`: the size and sha256 of every other file in it.

Write order (a crash or a full disk at any point leaves the previous checkpoint untouched):
  1. every rank writes its DCP shards into `step-N.tmp/` and hashes the files it wrote;
  2. the ranks agree that all of them succeeded (one all_gather carrying the hashes or the error);
  3. rank 0 writes the side files and `manifest.json`, renames `step-N.tmp` -> `step-N`, then replaces `latest`;
  4. older checkpoints beyond the newest K are removed.
A failure in 1-3 removes `step-N.tmp` and raises `CheckpointSaveError` on every rank, so the trainer can log it and
go on (or stop cleanly). Loading verifies the manifest; `usable_checkpoints` skips a truncated or corrupt one
(reporting it) and yields, newest first, the checkpoints that verify.

Saves are synchronous (`save_checkpoint`) or asynchronous (`Checkpointer(async_save=True)`, built on
`dcp.async_save`): the step is blocked only while the state is copied to host memory; the write, hashing and the
commit finish in a background thread as soon as the write is done. A failure is described by its cause (disk full,
read-only, permission, I/O, ...; save_errors.py). Naming, manifests, verification and listing: checkpoint_files.py.

State that belongs with an optimizer but is not in its state dict (DiLoCo's outer momentum and fragment backups,
train/cross_site.py) is registered on it (`attach_extra_state`) and saved and loaded under the `extra` key; a
checkpoint written without it loads with that state left as it is.
"""

from __future__ import annotations

import copy
import shutil
import weakref
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gigafactory.errors import UserError
from gigafactory.parallel.distributed import all_gather_objects, barrier, broadcast_from_rank0, get_rank, is_rank0
from gigafactory.train.checkpoint_files import (
    MANIFEST, LogEvent, checkpoint_name, file_digest, fsync_dir, list_checkpoints, own_shard_files, verify_checkpoint,
    write_manifest,
)
from gigafactory.train.save_errors import describe_save_error

LATEST = "latest"

# DCP warns on every single-process save/load; that is a supported mode here, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# optimizer -> an object with checkpoint_state() -> dict[str, Tensor] and load_checkpoint_state(dict)
_EXTRA_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach_extra_state(optimizer, holder) -> None:
    """Save `holder.checkpoint_state()` with every checkpoint of `optimizer`, and give it back on load."""
    _EXTRA_STATE[optimizer] = holder


def _holder(optimizer):
    """The extra state attached to `optimizer`; None for none, or for what cannot carry one (a list of optimizers)."""
    try:
        return _EXTRA_STATE.get(optimizer)
    except TypeError:  # not weakly referenceable or not hashable
        return None


def _with_extra(state: dict, optimizer) -> dict:
    holder = _holder(optimizer)
    if holder is not None:
        state["extra"] = holder.checkpoint_state()
    return state


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank (disk full, I/O error, ...). The partial `.tmp` directory was removed and every
    earlier checkpoint is intact. Raised on every rank, so all ranks can catch it at the same point."""

    def __init__(self, step: int, path: Path, reason: str):
        super().__init__(f"checkpoint save at step {step} failed ({reason}); previous checkpoints are intact")
        self.step, self.path, self.reason = step, path, reason


class CorruptCheckpointError(UserError):
    """A checkpoint's files do not match its manifest (truncated, bit-flipped, missing)."""


# ---- saving ------------------------------------------------------------------------------------------------------
def _write_shards(tmp: Path, state: dict, step: int) -> tuple[bool, str, dict]:
    """(ok, reason, {file: digest}) for this rank's part of a synchronous save."""
    try:
        dcp.save(state, checkpoint_id=str(tmp))
        return True, "", {p.name: file_digest(p) for p in own_shard_files(tmp, get_rank())}
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - any failure must reach the agreement step (DCP's is a BaseException)
        return False, describe_save_error(err, tmp), {}


def _finish(ckpt_root: Path, step: int, tmp: Path, final: Path, local: tuple[bool, str, dict], side_files: dict[str, str], keep: int,
            hooks: "CommitHooks", group=None) -> Path:
    """Agree on success, then (rank 0) side files, manifest, rename, `latest`, pruning. Collective over `group`."""
    parts = all_gather_objects(local, group)
    failed = list(dict.fromkeys(reason if reason.startswith("rank ") else f"rank {r}: {reason}" for r, (ok, reason, _) in enumerate(parts) if not ok))
    outcome = ""
    if not failed and is_rank0():
        try:
            if hooks.before_commit is not None:
                hooks.before_commit(step)
            known = {name: d for _, _, digests in parts for name, d in digests.items()}
            for name, text in side_files.items():
                (tmp / name).write_text(text)
            write_manifest(tmp, known)
            fsync_dir(tmp)
            aside = None
            if final.exists():  # re-saving a step (after a rollback): keep the old one until the new one is in place
                aside = final.with_name(final.name + ".old")
                shutil.rmtree(aside, ignore_errors=True)
                final.rename(aside)
            tmp.rename(final)
            fsync_dir(ckpt_root)
            pointer = ckpt_root / (LATEST + ".tmp")
            pointer.write_text(final.name + "\n")
            pointer.replace(ckpt_root / LATEST)
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
            for old in list_checkpoints(ckpt_root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as err:  # noqa: BLE001
            outcome = f"rank 0: {describe_save_error(err, tmp)}"
    if not failed:
        outcome = broadcast_from_rank0(outcome, group)
        failed = [outcome] if outcome else []
    if failed:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists() and final.with_name(final.name + ".old").exists():
                final.with_name(final.name + ".old").rename(final)
        barrier(group)
        raise CheckpointSaveError(step, final, "; ".join(failed))
    if is_rank0() and hooks.after_commit is not None:
        hooks.after_commit(step, final)
    return final


def _prepare_tmp(ckpt_root: Path, step: int) -> tuple[Path, Path, str]:
    """Create an empty `step-N.tmp/` (rank 0); returns (tmp, final, error-or-empty agreed by all ranks)."""
    final = Path(ckpt_root) / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    error = ""
    if is_rank0():
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = f"rank 0: {describe_save_error(err, tmp)}"
    return tmp, final, broadcast_from_rank0(error)


@dataclass
class CommitHooks:
    """Calls around the commit, on rank 0 (fault injection): before the rename, and once the checkpoint is final."""

    before_commit: Callable[[int], None] | None = None
    after_commit: Callable[[int, Path], None] | None = None


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, train_state: dict, side_files: dict[str, str], keep: int,
                    hooks: CommitHooks | None = None) -> Path:
    """Write checkpoint `step` synchronously; raises CheckpointSaveError (on every rank) if any part fails."""
    ckpt_root = Path(ckpt_root)
    tmp, final, error = _prepare_tmp(ckpt_root, step)
    if error:
        raise CheckpointSaveError(step, final, error)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    local = _write_shards(tmp, _with_extra({"model": model_sd, "optim": optim_sd, "train_state": train_state}, optimizer), step)
    return _finish(ckpt_root, step, tmp, final, local, side_files, keep, hooks or CommitHooks())


class Checkpointer:
    """Saves checkpoints synchronously or asynchronously (`dcp.async_save`); at most one save in flight.

    save(): sync -> returns the checkpoint Path when committed; async -> returns None as soon as the state is staged
    in host memory (the step may then change the weights). An async save then writes, hashes and commits itself
    (manifest, rename, `latest`) in a background thread as soon as every rank's write is done, agreeing over a
    dedicated gloo group, so it is never worth less than a sync save. finalize() waits for it and returns its Path;
    save() calls it before starting the next one; call it before a rollback/load and at the end of training.
    A failed save is logged (`checkpoint_failed`) when it happens and raises CheckpointSaveError from save() (sync)
    or finalize() (async)."""

    def __init__(self, ckpt_root: Path, keep: int, async_save: bool = False, log_event: LogEvent | None = None,
                 hooks: CommitHooks | None = None):
        self.root, self.keep, self.async_save = Path(ckpt_root), keep, async_save
        self.log_event, self.hooks = log_event, hooks or CommitHooks()
        self._pending: tuple[int, Future] | None = None  # (step, future of the committed Path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-commit") if async_save else None
        self._pg = None
        # Host buffers allocated once and reused by every save (page-faulting a fresh copy each time costs ~2x).
        self._stager = _CachedHostStager() if async_save else None
        self.last_blocked_s = 0.0

    @property
    def pending_step(self) -> int | None:
        return self._pending[0] if self._pending else None

    def save(self, step: int, model, optimizer, train_state: dict, side_files: dict[str, str]) -> Path | None:
        started = time.perf_counter()
        self.finalize()
        if not self.async_save:
            try:
                path = save_checkpoint(self.root, step, model, optimizer, train_state, side_files, self.keep, self.hooks)
            except CheckpointSaveError as err:
                self._log("checkpoint_failed", step=step, reason=err.reason)
                raise
            self.last_blocked_s = time.perf_counter() - started
            self._log("checkpoint_saved", step=step, path=str(path), blocked_s=round(self.last_blocked_s, 4))
            return path
        tmp, final, error = _prepare_tmp(self.root, step)
        if error:
            self._log("checkpoint_failed", step=step, reason=error)
            raise CheckpointSaveError(step, final, error)
        group = self._save_group()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = _with_extra({"model": model_sd, "optim": optim_sd, "train_state": copy.deepcopy(train_state)}, optimizer)
        try:
            upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group, async_stager=self._stager)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - staging failed: agree on it like any other failure
            upload = Future()
            upload.set_exception(err)
        rank, side_files, blocked = get_rank(), dict(side_files), time.perf_counter() - started

        def write_and_commit() -> Path:
            try:
                upload.result()
                local = (True, "", {p.name: file_digest(p) for p in own_shard_files(tmp, rank)})
            except (Exception, CheckpointException) as err:  # noqa: BLE001
                local = (False, describe_save_error(err, tmp), {})
            try:
                path = _finish(self.root, step, tmp, final, local, side_files, self.keep, self.hooks, group)
            except CheckpointSaveError as err:
                self._log("checkpoint_failed", step=step, reason=err.reason)
                raise
            self._log("checkpoint_saved", step=step, path=str(path), blocked_s=round(blocked, 4),
                      write_s=round(time.perf_counter() - started, 4))
            return path

        self._pending = (step, self._pool.submit(write_and_commit))
        self.last_blocked_s = blocked
        return None

    def done_locally(self) -> bool:
        """True when no save is in flight on this rank (not collective; do not branch collectives on it)."""
        return self._pending is None or self._pending[1].done()

    def finalize(self) -> Path | None:
        """Wait for the save in flight (if any); its Path, or CheckpointSaveError. Not a collective of the training
        process group (the commit's collectives run on the writer's own group)."""
        if self._pending is None:
            return None
        _, future = self._pending
        self._pending = None
        return future.result()

    def close(self) -> Path | None:
        """Finalize and release the background thread; returns the last committed path (or None)."""
        try:
            return self.finalize()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _save_group(self):
        """A dedicated gloo group for the background writer, so its collectives never interleave with training's."""
        if not dist.is_initialized():
            return None
        if self._pg is None:
            self._pg = dist.new_group(backend="gloo")
        return self._pg

    def _log(self, event: str, **fields) -> None:
        if self.log_event is not None:
            self.log_event(event, once=True, **fields)


class _CachedHostStager:
    """DCP AsyncStager that copies the state into host buffers allocated on the first save and reused afterwards
    (pinned when CUDA is present, so the device-to-host copy runs at full bandwidth). Safe because a Checkpointer
    finalises the previous save, which reads these buffers, before it stages the next one."""

    should_synchronize_after_execute = False

    def __init__(self):
        self._cache = None

    def stage(self, state_dict):
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        if self._cache is None:
            self._cache = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state_dict, self._cache, non_blocking=False, type_check=False)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._cache = None


# ---- loading -----------------------------------------------------------------------------------------------------
def load_checkpoint(ckpt: Path, model, optimizer=None, train_state: dict | None = None, verify: bool = False) -> dict:
    """Load model (and optimizer) state in place; fill and return `train_state` (DCP loads only the keys given).

    verify=True checks the manifest first (collective) and raises CorruptCheckpointError on a mismatch."""
    if verify:
        problems = verify_checkpoint(Path(ckpt))
        if problems and problems != [f"{MANIFEST} missing"]:
            raise CorruptCheckpointError(f"checkpoint '{ckpt}' is corrupt ({'; '.join(problems[:3])}); use an earlier checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    state = {"model": model_sd}
    if train_state is not None:
        state["train_state"] = train_state
    if optimizer is not None:
        state["optim"] = optim_sd
        if _holder(optimizer) is not None and _has_extra(Path(ckpt)):
            _with_extra(state, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as err:  # DCP wraps shape/key mismatches in CheckpointException
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size" in line or "Missing" in line or "shape" in line), first[0] if first else "")
        raise UserError(f"checkpoint '{ckpt}' does not match this model ({detail[:200]}); use the model config it was saved with") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if "extra" in state:
            _holder(optimizer).load_checkpoint_state(state["extra"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return state.get("train_state", {})


def _has_extra(ckpt: Path) -> bool:
    """Whether the checkpoint holds extra optimizer state (one saved by a run without it does not)."""
    try:
        keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - unreadable metadata: dcp.load reports it
        return False
    return any(k.startswith("extra.") for k in keys)


__all__ = ["Checkpointer", "attach_extra_state", "CheckpointSaveError", "CorruptCheckpointError", "LATEST", "load_checkpoint",
           "save_checkpoint"]
