"""`gigafactory train --nproc N`: run the same command under torchrun on this machine, as a well-behaved job.

- Signals: torchrun and its workers run in sessions of their own, so the terminal's Ctrl-C reaches only this
  process, which forwards SIGTERM to the workers: they finish the step, save and exit 0, torchrun ends cleanly (no
  agent traceback), and this process exits 128 + the signal. A second Ctrl-C kills everything at once.
- User errors: a worker that hits a UserError (bad data, an unusable checkpoint, a stop) writes its one-line message
  to a private file and exits 2; this process then kills the job instead of letting torchrun retry it, prints the line
  and exits 2. Failures that are not the user's (a crash, a hang, a lost rank) are still retried by torchrun.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gigafactory.errors import UserError

ERROR_FILE_FLAG = "--user-error-file"


def worker_pids(parent: int) -> list[int]:
    """Direct children of `parent` (torchrun's workers), read from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def _kill(pid: int, sig: int, group: bool) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class LocalJob:
    def __init__(self, cmd: list[str]):
        self.error_file = Path(tempfile.mkdtemp(prefix="gigafactory-")) / "user_error"
        self.proc = subprocess.Popen([*cmd, f"{ERROR_FILE_FLAG}={self.error_file}"], start_new_session=True)
        self.signum: int | None = None

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.kill()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"gigafactory: {signal.Signals(signum).name}: the workers finish their step, save and exit "
              "(press Ctrl-C again to kill them now)", file=sys.stderr, flush=True)
        for pid in worker_pids(self.proc.pid):
            _kill(pid, signal.SIGTERM, group=False)

    def kill(self) -> None:
        workers = worker_pids(self.proc.pid)
        _kill(self.proc.pid, signal.SIGKILL, group=True)
        for pid in workers:
            _kill(pid, signal.SIGKILL, group=True)
        self.proc.wait()

    def wait(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.proc.poll() is None:
                if self.error_file.is_file():
                    time.sleep(0.2)  # let every rank that failed alike finish writing
                    self.kill()
                    break
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.error_file.is_file():
            message = self.error_file.read_text(errors="replace").strip().splitlines()
            raise UserError(message[0] if message else "a worker stopped with a user error")
        if self.signum is not None:
            return 128 + self.signum
        return self.proc.returncode


def run_local(argv: list[str], nproc: int, max_restarts: int) -> int:
    """Re-run `gigafactory train ARGV` under torchrun's elastic agent with `nproc` workers on this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "-m", "gigafactory.cli.main", "train", *argv]
    job = LocalJob(cmd)
    try:
        return job.wait()
    finally:
        if job.proc.poll() is None:
            _kill(job.proc.pid, signal.SIGKILL, group=True)
        try:
            job.error_file.unlink(missing_ok=True)
            job.error_file.parent.rmdir()
        except OSError:
            pass
