"""Checks a job can pass before any process starts or any step runs: a user error is one line, never a restart."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from gigafactory.config.job import JobConfig
from gigafactory.data.corpus import input_paths
from gigafactory.errors import UserError


def check_run_dir(path: str | Path) -> Path:
    """The run directory, created if missing; UserError when it is a file, under a file, or not writable."""
    run_dir = Path(path).expanduser()
    if str(path).strip() == "":
        raise UserError("logging.run_dir is empty; pass a directory, e.g. --logging.run_dir runs/my-run")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"logging.run_dir '{run_dir}' is a file, not a directory; pass a directory path")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        why = {errno.EROFS: "is on a read-only filesystem", errno.EACCES: "is not writable", errno.EPERM: "is not writable",
               errno.ENOTDIR: "lies under a file", errno.ENOSPC: "is on a full disk"}.get(err.errno, f"cannot be written ({err.strerror or err})")
        raise UserError(f"logging.run_dir '{run_dir}' {why}; pass a writable directory") from None
    return run_dir


def preflight(cfg: JobConfig) -> None:
    """What the launching process can check cheaply for every worker: the run directory and the data files."""
    check_run_dir(cfg.logging.run_dir)
    input_paths(cfg.data.inputs)
    if cfg.data.tokenizer and not Path(cfg.data.tokenizer).expanduser().is_file():
        raise UserError(f"data.tokenizer '{cfg.data.tokenizer}' is not a file; pass a tokenizer.json from `gigafactory data tokenizer`")
