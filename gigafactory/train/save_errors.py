"""Why a checkpoint save failed, in words an operator can act on: disk full, quota, read-only, permission, I/O."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

_KINDS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only filesystem",
          errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EIO: "I/O error",
          errno.EFBIG: "file too large", errno.ENOENT: "directory vanished", errno.ENOTDIR: "not a directory"}


def describe_save_error(err: BaseException, directory: Path) -> str:
    """'<kind> (<detail>)' for a failed save. DCP often hides the OSError behind its own exception (a full disk shows
    as 'enforce fail ... unexpected pos'), so when the chain names no errno, a 1 MiB probe write in `directory`
    finds the cause, and the free space is reported either way. DCP's gathered per-rank failures are described rank
    by rank ("rank 1: disk full (...)")."""
    failures = getattr(err, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {describe_save_error(e[0] if isinstance(e, tuple) else e, directory)}" for r, e in sorted(failures.items()))
    found = _os_error(err)
    detail = _first_line(found or _innermost(err))
    if found is None or found.errno not in _KINDS:
        probe = _probe_write(directory)
        found = probe or found
    kind = _KINDS.get(getattr(found, "errno", None), "save error")
    try:
        free = f"; {shutil.disk_usage(_existing_parent(directory)).free / 2**20:.1f} MiB free"
    except OSError:
        free = ""
    return f"{kind} ({detail}{free})"


def _os_error(err: BaseException | None, seen=None) -> OSError | None:
    """The first OSError with an errno in err, its DCP per-rank failures, causes and contexts."""
    seen = seen or set()
    if err is None or id(err) in seen:
        return None
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno is not None:
        return err
    nested = [e[0] if isinstance(e, tuple) else e for e in (getattr(err, "failures", None) or {}).values()]
    for inner in [*nested, err.__cause__, err.__context__]:
        if isinstance(inner, BaseException) and (found := _os_error(inner, seen)) is not None:
            return found
    return None


def _innermost(err: BaseException) -> BaseException:
    failures = getattr(err, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return err


def _first_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno is not None:
        return f"{errno.errorcode.get(err.errno, err.errno)}: {err.strerror or err}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _probe_write(directory: Path) -> OSError | None:
    probe = _existing_parent(directory) / f".gigafactory-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as err:
        return err
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def _existing_parent(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
