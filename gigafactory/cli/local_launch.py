"""`gigafactory train --nproc N`: run the same command under torchrun on this machine, as a well-behaved job.

- Signals: torchrun and its workers run in sessions of their own, so the terminal's Ctrl-C reaches only this
  process, which forwards SIGTERM to the workers: they finish the step, save and exit 0, torchrun ends cleanly (no
  agent traceback), and this process exits 128 + the signal. A second Ctrl-C kills everything at once.
- User errors: a worker that hits a UserError (bad data, an unusable checkpoint, a stop) writes its one-line message
  to a private file and exits 2; this process then kills the job instead of letting torchrun retry it, prints the line
  and exits 2. Failures that are not the user's (a crash, a hang, a lost rank) are still retried by torchrun.
- Fault tolerance (fault_tolerance.enabled): the torchft lighthouse runs as a child process (restarted on its port
  if it dies) and each replica group is a torchrun of its own, restarting on its own; the job has finished when a
  group has finished training.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gigafactory.errors import UserError

ERROR_FILE_FLAG = "--user-error-file"


class Lighthouse:
    """The torchft lighthouse (its own binary, from the torchft wheel) for a local fault-tolerant job; restarted on
    the same port if it dies, so the replica groups' managers reconnect to it."""

    def __init__(self, ft):
        self.ft, self.proc, self.port = ft, None, 0

    def start(self) -> str:
        binary = shutil.which("torchft_lighthouse", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        if binary is None:
            raise UserError("fault_tolerance.enabled needs torchft (its torchft_lighthouse binary is not installed): pip install torchft")
        if not self.port:
            with socket.socket() as s:  # a free port, kept for restarts
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--bind", f"127.0.0.1:{self.port}", "--min_replicas", str(self.ft.min_replicas),
                                      "--join_timeout_ms", str(self.ft.join_timeout_ms), "--heartbeat_timeout_ms", str(self.ft.heartbeat_timeout_ms)],
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return f"http://127.0.0.1:{self.port}"
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise UserError(f"the torchft lighthouse did not start on 127.0.0.1:{self.port} (exit {self.proc.poll()})")

    def keep_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            print(f"gigafactory: the torchft lighthouse exited ({self.proc.returncode}); restarting it on port {self.port}",
                  file=sys.stderr, flush=True)
            self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


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
    """One or more torchrun jobs (one per replica group under fault tolerance), each in a session of its own."""

    def __init__(self, cmds: list[list[str]]):
        self.error_dir = Path(tempfile.mkdtemp(prefix="gigafactory-"))
        self.procs = [subprocess.Popen([*cmd, f"{ERROR_FILE_FLAG}={self.error_dir / f'user_error{i}'}"], start_new_session=True)
                      for i, cmd in enumerate(cmds)]
        self.signum: int | None = None
        self.supervised: list = []  # callables run while waiting (the lighthouse's keeper)

    def _errors(self) -> list[Path]:
        return sorted(self.error_dir.glob("user_error*"))

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: stop now
            self.kill()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"gigafactory: {signal.Signals(signum).name}: the workers finish their step, save and exit "
              "(press Ctrl-C again to kill them now)", file=sys.stderr, flush=True)
        for proc in self.procs:
            for pid in worker_pids(proc.pid):
                _kill(pid, signal.SIGTERM, group=False)

    def kill(self) -> None:
        for proc in self.procs:
            workers = worker_pids(proc.pid)
            _kill(proc.pid, signal.SIGKILL, group=True)
            for pid in workers:
                _kill(pid, signal.SIGKILL, group=True)
            proc.wait()

    def wait(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while any(proc.poll() is None for proc in self.procs):
                if self._errors():
                    time.sleep(0.2)  # let every rank that failed alike finish writing
                    self.kill()
                    break
                for keep in self.supervised:
                    keep()
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if errors := self._errors():
            message = errors[0].read_text(errors="replace").strip().splitlines()
            raise UserError(message[0] if message else "a worker stopped with a user error")
        if self.signum is not None:
            return 128 + self.signum
        codes = [proc.returncode for proc in self.procs]
        if len(codes) > 1 and 0 in codes:  # replica groups: the job is done when one group finished training
            for i, code in enumerate(codes):
                if code:
                    print(f"gigafactory: replica group {i} failed (exit {code}) and ran out of restarts; the other groups "
                          "finished the run", file=sys.stderr)
            return 0
        return max(codes, key=abs)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                _kill(proc.pid, signal.SIGKILL, group=True)
        shutil.rmtree(self.error_dir, ignore_errors=True)


def torchrun_cmd(argv: list[str], nproc: int, max_restarts: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
            "-m", "gigafactory.cli.main", "train", *argv]


def run_local(argv: list[str], nproc: int, max_restarts: int, ft=None) -> int:
    """Re-run `gigafactory train ARGV` under torchrun's elastic agent with `nproc` workers on this machine; with
    fault tolerance (`ft`, a FaultToleranceConfig), a torchft lighthouse and one torchrun per replica group."""
    lighthouse = None
    if ft is None or not ft.enabled:
        job = LocalJob([torchrun_cmd(argv, nproc, max_restarts)])
    else:
        if nproc % ft.replica_groups:
            raise UserError(f"--nproc={nproc} must be a multiple of fault_tolerance.replica_groups={ft.replica_groups}")
        lighthouse = Lighthouse(ft)
        address = ft.lighthouse or lighthouse.start()
        job = LocalJob([torchrun_cmd([*argv, f"--fault_tolerance.replica_id={g}", f"--fault_tolerance.lighthouse={address}"],
                                     nproc // ft.replica_groups, max_restarts) for g in range(ft.replica_groups)])
        if not ft.lighthouse:
            job.supervised.append(lighthouse.keep_alive)
    try:
        return job.wait()
    finally:
        job.cleanup()
        if lighthouse is not None:
            lighthouse.stop()
