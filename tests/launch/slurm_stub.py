"""A stand-in for Slurm on one machine: `srun` runs one task per "node" and `scontrol` names the nodes.

Real Slurm is not installable here as a cluster; the generated sbatch script is run as is with these stubs on PATH.
What the stub srun keeps of real srun (sbatch(1), srun(1)): it starts `--nodes` copies of the task, each in its own
session with SLURM_NODEID/SLURM_PROCID set; SIGTERM sent to srun is forwarded to every task; with
`--kill-on-bad-exit=1` a task that exits non-zero (or is killed) ends the others at once. Like slurmstepd, which
tracks a step's processes in a cgroup, it signals every process of the step (torchrun's workers included, which
torchrun starts in sessions of their own) and kills whatever is left when the step ends. `scontrol show hostnames` prints the nodes; `scontrol requeue ID` is recorded.
A step named with `--job-name=NAME` (the fault-tolerant script names its lighthouse and group steps) logs to
`NAME.node<i>.log` and `NAME.node<i>.pid`; with `--nodelist=a,b` task i gets SLURMD_NODENAME, the i-th host, as on
real Slurm; every step is recorded in `steps.log`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it: the tree is listed first, so no process can spawn a new one after."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _srun(argv: list[str]) -> int:
    nodes, kill_on_bad_exit, name, hosts = 1, False, "", []
    while argv and argv[0].startswith("--"):
        flag = argv.pop(0)
        if flag.startswith("--nodes="):
            nodes = int(flag.split("=", 1)[1])
        elif flag.startswith("--job-name="):
            name = flag.split("=", 1)[1] + "."
        elif flag.startswith("--nodelist="):
            hosts = flag.split("=", 1)[1].split(",")
        kill_on_bad_exit |= flag == "--kill-on-bad-exit=1"
    assert not hosts or len(hosts) == nodes, f"srun: --nodelist names {len(hosts)} hosts for --nodes={nodes}"
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come back to us
    log_dir = Path(os.environ["STUB_SLURM_DIR"])
    with open(log_dir / "steps.log", "a") as f:
        f.write(f"{name.rstrip('.') or '-'} nodes={nodes} nodelist={','.join(hosts)} kill_on_bad_exit={int(kill_on_bad_exit)}\n")
    tasks = []
    for node in range(nodes):
        env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_STEP_ID="0")
        if hosts:
            env["SLURMD_NODENAME"] = hosts[node]
        with open(log_dir / f"{name}node{node}.log", "a") as log:
            tasks.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        (log_dir / f"{name}node{node}.pid").write_text(str(tasks[-1].pid))

    def forward(signum, _frame):  # slurmstepd signals every process of the step, not only the task
        for pid in descendants(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    rc = 0
    try:
        while True:
            codes = [task.poll() for task in tasks]  # every task, every time (any() would stop at the first)
            if None not in codes or (kill_on_bad_exit and any(code not in (None, 0) for code in codes)):
                break
            time.sleep(0.05)
        rc = next((task.returncode for task in tasks if task.returncode), 0)
    finally:
        _end_step()
    return 1 if rc else 0


def _end_step() -> None:
    """Kill and reap every process left in the step (we are their subreaper), as slurmstepd does at step end."""
    for _ in range(100):
        left = descendants(os.getpid())
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _scontrol(argv: list[str]) -> int:
    log_dir = Path(os.environ["STUB_SLURM_DIR"])
    if argv[:2] == ["show", "hostnames"]:
        print("\n".join(os.environ.get("STUB_SLURM_HOSTS", "127.0.0.1").split(",")))
        return 0
    with open(log_dir / "scontrol.log", "a") as f:
        f.write(" ".join(argv) + "\n")
    return 0


def install(bin_dir: Path, state_dir: Path, hosts: str = "127.0.0.1") -> dict[str, str]:
    """Write `srun` and `scontrol` into bin_dir; returns the environment a script needs to find them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("srun", "scontrol"):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                        f"import slurm_stub\nsys.exit(slurm_stub._{name}(sys.argv[1:]))\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_SLURM_DIR": str(state_dir), "STUB_SLURM_HOSTS": hosts}
