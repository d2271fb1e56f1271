"""Distributed checkpoints (torch.distributed.checkpoint) written atomically, with the newest K kept.

A checkpoint is a directory `step-NNNNNNNN/` holding the DCP shards of the model and optimizer, a `train_state`
entry (step, data loader position), and copies of config.toml and tokenizer.json so it is self-contained. It is
written under a `.tmp` name and renamed when complete; the `latest` pointer file is replaced last.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from gigafactory.errors import UserError

LATEST = "latest"

# DCP warns on every single-process save/load; that is a supported mode here, not a mistake.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, train_state: dict, side_files: dict[str, str], keep: int) -> Path:
    """Write checkpoint `step`; the previous good checkpoint stays untouched until this one is complete."""
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / (checkpoint_name(step) + ".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "train_state": train_state}, checkpoint_id=str(tmp))
    _barrier()
    if _is_rank0():
        for name, text in side_files.items():
            (tmp / name).write_text(text)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        pointer = ckpt_root / (LATEST + ".tmp")
        pointer.write_text(final.name + "\n")
        pointer.replace(ckpt_root / LATEST)
        for old in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (unfinished `.tmp` directories are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp") and (p / ".metadata").is_file())


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a checkpoints/ directory or a run directory; return one checkpoint."""
    p = Path(path).expanduser()
    if (p / ".metadata").is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise UserError(f"no checkpoint found at '{p}'; pass a run directory or a checkpoints/step-N directory written by `gigafactory train`")


def load_checkpoint(ckpt: Path, model, optimizer=None, train_state: dict | None = None) -> dict:
    """Load model (and optimizer) state in place; fill and return `train_state` (DCP loads only the keys given)."""
    model_sd, optim_sd = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    state = {"model": model_sd}
    if train_state is not None:
        state["train_state"] = train_state
    if optimizer is not None:
        state["optim"] = optim_sd
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except Exception as err:  # DCP wraps shape/key mismatches in CheckpointException
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size" in line or "Missing" in line or "shape" in line), first[0] if first else "")
        raise UserError(f"checkpoint '{ckpt}' does not match this model ({detail[:200]}); use the model config it was saved with") from None
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    return state.get("train_state", {})

