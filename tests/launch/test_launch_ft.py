"""`gigafactory launch slurm|k8s` with replica-group fault tolerance (torchft).

The sbatch script is run as is under the stub Slurm (tests/launch/slurm_stub.py) with the real torchft lighthouse
binary and fake ranks: each group is its own step with its own rendezvous and replica_id, every rank reaches the
lighthouse at the address it was given, a failed group is started again while the other is never touched, and
the time limit / scancel paths still save, requeue or stop. Manifests are checked against the Kubernetes and
Kubeflow schemas (tests/launch/k8s_schema.py) and for the wiring between the lighthouse Service and the groups.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigafactory.launch.spec import _check_train_args
from tests.launch import slurm_stub
from tests.launch.launch_helpers import check_sbatch, launch, load_yaml_documents, pod_of, write_config

FT = "\n[fault_tolerance]\nenabled = true\nreplica_groups = {groups}\n"


def ft_config(tmp_path: Path, groups: int = 2, parallel: str = "dp_shard = -1") -> Path:
    return write_config(tmp_path, parallel=parallel, name="ft.toml", extra=FT.format(groups=groups))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_of(argv: list[str]) -> int:
    """The replica group a worker command line makes, read by the trainer's own flag parser."""
    cut = argv.index("train") + 1
    args = [a for a in argv[cut:] if a not in ("--config",) and not a.endswith(".toml")]
    return int(vars(_check_train_args(args))["fault_tolerance.replica_id"])


# --- Slurm: the script's shape ---------------------------------------------------------------------------------


def test_ft_sbatch_has_a_lighthouse_step_and_one_step_per_group(tmp_path, capsys):
    config = ft_config(tmp_path, groups=3)
    rc, out, err = launch(capsys, "slurm", "--nodes", "6", "--gpus-per-node", "4", "--config", str(config), "--partition", "gpu")
    assert rc == 0, err
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)
    sbatch = check_sbatch(out, tmp_path)
    assert sbatch["nodes"] == "6" and "no-kill" in sbatch and sbatch["signal"].startswith("B:USR1@") and "requeue" in sbatch
    assert "N_GROUPS=3" in out and "NODES_PER_GROUP=2" in out and "--nnodes=2" in out and "--nproc-per-node=4" in out
    lighthouse_srun = next(line for line in out.splitlines() if "--job-name=lighthouse" in line)
    assert "--overlap" in lighthouse_srun and "--kill-on-bad-exit" not in lighthouse_srun
    assert '--bind 0.0.0.0:29510 --min_replicas 1' in out and 'LIGHTHOUSE="http://$LIGHTHOUSE_HOST:29510"' in out
    # one srun per group, each confined to its group: --kill-on-bad-exit appears only there
    assert out.count("--kill-on-bad-exit=1") == 1 and '--job-name="group$g"' in out
    assert "parallel layout dp_shard=8" in out  # the layout is one group's: 2 nodes x 4 GPUs


def test_plain_output_has_nothing_of_fault_tolerance(tmp_path, capsys):
    config = write_config(tmp_path, parallel="dp_shard = -1")
    for target in ("slurm", "k8s"):
        rc, out, _ = launch(capsys, target, "--nodes", "2", "--gpus-per-node", "2", "--config", str(config))
        assert rc == 0 and "lighthouse" not in out and "fault_tolerance" not in out and "no-kill" not in out
        assert "exclude" not in out and "affinity" not in out


# --- Slurm: the script run under the stub, with the real lighthouse -----------------------------------------------

FAKE_RANK = """\
import json, os, re, signal, socket, sys, time
from pathlib import Path
state = Path(os.environ["STUB_SLURM_DIR"])
argv = sys.argv[1:]
group = int(next(a for a in argv if a.startswith("--fault_tolerance.replica_id=")).split("=", 1)[1])
address = next(a for a in argv if a.startswith("--fault_tolerance.lighthouse=")).split("=", 1)[1]
node = os.environ["SLURM_NODEID"]
me = f"g{group}-n{node}-{os.getpid()}"
def stop(signum, frame):
    (state / f"sigterm-{me}").write_text("")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
host, port = re.fullmatch(r"http://(.+):(\\d+)", address).groups()
reached = False
for _ in range(100):  # the lighthouse step starts first, but may still be binding
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        reached = True
        break
    except OSError:
        time.sleep(0.05)
(state / f"started-{me}").write_text(json.dumps({"argv": argv, "host": os.environ.get("SLURMD_NODENAME"), "lighthouse": reached}))
fail = state / f"fail-g{group}"
while True:
    if node == "0" and fail.exists():
        fail.unlink()
        sys.exit(3)  # this group's torchrun gave up: --kill-on-bad-exit ends its step
    time.sleep(0.05)
"""


def lighthouse_binary() -> str:
    found = shutil.which("torchft_lighthouse", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.skip("torchft (its torchft_lighthouse binary) is not installed")
    return found


def reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def started(state: Path) -> dict[str, dict]:
    """The fake ranks that have started (a file still being written counts on the next poll)."""
    out = {}
    for p in state.glob("started-*"):
        try:
            out[p.name.removeprefix("started-")] = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
    return out


def wait_until(proc: subprocess.Popen, what, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "timeout"
        time.sleep(0.05)
    return value


def run_ft_script(tmp_path: Path, capsys) -> tuple[subprocess.Popen, Path, int]:
    """4 stub nodes (distinct names, all this machine), 2 groups of 2; returns the batch shell, state dir, lighthouse port."""
    lighthouse_port = free_port()
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "1", "--name", "ftjob", "--config", str(ft_config(tmp_path)),
                          "--port", str(free_port()), "--lighthouse-port", str(lighthouse_port), "--max-restarts", "1")
    assert rc == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!{sys.executable}\n{FAKE_RANK}")
    fake.chmod(0o755)
    state = tmp_path / "slurm"
    hosts = "localhost,127.0.0.1,127.0.0.2,127.0.0.3"  # node 0 (the lighthouse's) must resolve to this machine
    env = {**os.environ, **slurm_stub.install(tmp_path / "bin", state, hosts=hosts), "PYTHON": str(fake),
           "TORCHFT_LIGHTHOUSE": lighthouse_binary(), "SLURM_JOB_NODELIST": "n[0-3]", "SLURM_JOB_ID": "777"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, state, lighthouse_port


def stop_tree(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        for pid in slurm_stub.descendants(proc.pid):
            slurm_stub.kill_tree(pid)
        proc.kill()
        proc.wait()


@pytest.mark.skipif(sys.platform != "linux", reason="the stub srun needs /proc and PR_SET_CHILD_SUBREAPER")
def test_ft_sbatch_groups_restart_alone_and_the_time_limit_requeues(tmp_path, capsys):
    proc, state, lighthouse_port = run_ft_script(tmp_path, capsys)
    try:
        first = wait_until(proc, lambda: s if len(s := started(state)) == 4 else None)
        by_group: dict[int, list[dict]] = {}
        for who, rec in first.items():
            assert rec["lighthouse"], f"{who} could not reach the lighthouse at the address it was given"
            by_group.setdefault(group_of(rec["argv"]), []).append(rec)
        assert sorted(by_group) == [0, 1] and all(len(recs) == 2 for recs in by_group.values())
        assert {r["host"] for r in by_group[0]} == {"localhost", "127.0.0.1"} and {r["host"] for r in by_group[1]} == {"127.0.0.2", "127.0.0.3"}
        endpoints, ids = set(), set()
        for g, recs in by_group.items():
            argv = recs[0]["argv"]
            endpoints.add(next(a for a in argv if a.startswith("--rdzv-endpoint=")))
            ids.add(next(a for a in argv if a.startswith("--rdzv-id=")))
            assert "--nnodes=2" in argv and all(r["argv"] == argv for r in recs)  # one rendezvous per group
            assert f"--fault_tolerance.lighthouse=http://localhost:{lighthouse_port}" in argv
        assert len(endpoints) == 2 and ids == {"--rdzv-id=777-group0", "--rdzv-id=777-group1"}

        # group 1's torchrun gives up: only its step ends, the script starts it again, group 0 is never touched
        (state / "fail-g1").write_text("")
        again = wait_until(proc, lambda: [k for k in started(state) if k.startswith("g1-") and k not in first] if len(started(state)) == 6 else None)
        assert len(again) == 2 and not list(state.glob("sigterm-*"))
        steps = (state / "steps.log").read_text().splitlines()
        assert [s.split()[0] for s in steps].count("group1") == 2 and [s.split()[0] for s in steps].count("group0") == 1
        assert [s.split()[0] for s in steps].count("lighthouse") == 1 and "kill_on_bad_exit=0" in next(s for s in steps if s.startswith("lighthouse"))
        group0 = sorted(k for k in first if k.startswith("g0-"))
        assert all(slurm_stub.descendants(proc.pid).count(int(k.rsplit("-", 1)[1])) == 1 for k in group0)  # still running

        # the lighthouse dies: it is started again on the same node and port
        os.kill(int((state / "lighthouse.node0.pid").read_text()), signal.SIGKILL)
        wait_until(proc, lambda: (state / "steps.log").read_text().count("lighthouse ") == 2)
        wait_until(proc, lambda: reachable(lighthouse_port))

        proc.send_signal(signal.SIGUSR1)  # the time limit's warning
        out, _ = proc.communicate(timeout=30)
    finally:
        stop_tree(proc)
    assert proc.returncode == 0, out
    live = group0 + again
    assert sorted(p.name.removeprefix("sigterm-") for p in state.glob("sigterm-*")) == sorted(live), out
    assert (state / "scontrol.log").read_text() == "requeue 777\n"
    assert "replica group 1 exited 1; starting it again (run 2)" in out and "requeued" in out
    assert not reachable(lighthouse_port)  # the lighthouse was stopped with the job
    assert "the torchft lighthouse exited; starting it again" in out


@pytest.mark.skipif(sys.platform != "linux", reason="the stub srun needs /proc and PR_SET_CHILD_SUBREAPER")
def test_ft_sbatch_after_scancel_restarts_nothing_and_does_not_requeue(tmp_path, capsys):
    proc, state, _ = run_ft_script(tmp_path, capsys)
    try:
        wait_until(proc, lambda: len(started(state)) == 4)
        proc.send_signal(signal.SIGTERM)  # scancel: the batch shell gets TERM ...
        time.sleep(0.5)
        (state / "fail-g1").write_text("")  # ... a group fails while the job stops: it must not start again
        wait_until(proc, lambda: not (state / "fail-g1").exists())
        for pid in slurm_stub.descendants(proc.pid):  # ... and Slurm signals every step itself
            try:
                if b"srun" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGTERM)
            except (FileNotFoundError, ProcessLookupError):
                pass  # a process that ended meanwhile (the watch loop's sleep)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop_tree(proc)
    assert len(started(state)) == 4 and not (state / "scontrol.log").exists(), out
    assert "starting it again" not in out and proc.returncode == 0, out  # group 0 saved and exited 0


@pytest.mark.skipif(sys.platform != "linux", reason="the stub srun needs /proc and PR_SET_CHILD_SUBREAPER")
def test_ft_sbatch_trains_two_replica_groups_in_one_quorum(tmp_path, capsys):
    """The real thing, small (about 15 s): the generated script under the stub Slurm runs the lighthouse, two real
    torchrun rendezvous and trainers (1 node x 1 process per group, gloo); both groups train every step in a quorum
    of two, so the flags, the quoting and the lighthouse address work as written."""
    from gigafactory.resilience.events import read_events
    from tests.conftest import TINY_MODEL
    from tests.launch.test_multinode import small_corpus

    run_dir, steps = tmp_path / "run", 4
    flags = [f"--model.{k}={v}" for k, v in TINY_MODEL.items()] + [
        "--model.aux_loss_weight=0", "--model.router_z_loss_weight=0", f"--data.inputs={small_corpus(tmp_path / 'small.jsonl')}",
        f"--data.cache_dir={tmp_path / 'cache'}", "--data.seq_len=32", "--training.batch_size=4", f"--training.steps={steps}",
        "--training.eval_every=0", "--training.dtype=fp32", "--training.device=cpu", "--optimizer.warmup_steps=2",
        f"--checkpoint.every={steps}", f"--logging.run_dir={run_dir}", "--logging.log_every=1", "--logging.tensorboard=false",
        "--logging.progress=false", "--resilience.term_grace_s=30", "--resilience.straggler_every=0",
        "--fault_tolerance.enabled=true", "--fault_tolerance.replica_groups=2",
    ]
    script = tmp_path / "job.sbatch"
    rc, _, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "1", "--port", str(free_port()), "--lighthouse-port", str(free_port()),
                        "--name", "ftdrill", "--time", "10", "--out", str(script), "--", *flags)
    assert rc == 0, err
    state = tmp_path / "slurm"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(slurm_stub.install(tmp_path / "bin", state, hosts="localhost,127.0.0.1"), PYTHON=sys.executable, SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="n[0-1]", TORCHFT_LIGHTHOUSE=lighthouse_binary())
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=240)
    why = proc.stdout + "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(state.glob("*.log")))
    assert proc.returncode == 0, why
    assert sorted(line.split()[0] for line in (state / "steps.log").read_text().splitlines()) == ["group0", "group1", "lighthouse"]
    losses = {}
    for g in (0, 1):
        records = [json.loads(line) for line in (run_dir / f"group{g}" / "metrics.jsonl").read_text().splitlines()]
        losses[g] = [(r["step"], r["loss"]) for r in records if "loss" in r]
        quorums = [e for e in read_events(run_dir / f"group{g}" / "events.jsonl") if e["event"] == "ft_quorum"]
        assert quorums and all(e["participants"] == 2 for e in quorums), (quorums, why)
    assert [step for step, _ in losses[0]] == list(range(1, steps + 1)) and losses[0] == losses[1]


# --- Kubernetes ---------------------------------------------------------------------------------------------------


def test_k8s_ft_lighthouse_service_and_one_pytorchjob_per_group(tmp_path, capsys):
    from tests.launch.k8s_schema import validate_manifest

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"bad_nodes": ["gpu-17", "gpu-17", "rack2.node-3"], "checked": 64}))
    rc, out, err = launch(capsys, "k8s", "--nodes", "6", "--gpus-per-node", "8", "--config", str(ft_config(tmp_path, groups=3)),
                          "--name", "big", "--kueue-queue", "lq", "--exclude", str(bad), "--port", "29600", "--", "--fault_tolerance.min_replicas=2")
    assert rc == 0, err
    docs = load_yaml_documents(out)
    validate_manifest(docs)
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service", "PyTorchJob", "PyTorchJob", "PyTorchJob"]
    _, deployment, service, *jobs = docs

    # the lighthouse: one pod, never two, bound where the Service sends traffic; its knobs from the config
    lh_pod = deployment["spec"]["template"]
    (lh,) = lh_pod["spec"]["containers"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["selector"]["matchLabels"].items() <= lh_pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= lh_pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == lh["ports"][0]["name"] and lh["ports"][0]["containerPort"] == port["port"] == 29510
    assert lh["command"][:3] == ["torchft_lighthouse", "--bind", "0.0.0.0:29510"] and lh["command"][lh["command"].index("--min_replicas") + 1] == "2"
    address = f"http://{service['metadata']['name']}:{port['port']}"

    seen = {"group": set(), "endpoint": set(), "id": set(), "port": set(), "name": set()}
    for job in jobs:
        spec = job["spec"]
        pod = pod_of(job)
        (container,) = pod["containers"]
        cmd = container["command"]
        assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2 and spec["runPolicy"]["schedulingPolicy"]["minAvailable"] == 2
        assert "--nnodes=2" in cmd and f"--fault_tolerance.lighthouse={address}" in cmd
        assert not service["spec"]["selector"].items() <= spec["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"].items()
        endpoint = next(a for a in cmd if a.startswith("--rdzv-endpoint="))
        assert endpoint == f"--rdzv-endpoint={job['metadata']['name']}-worker-0:{spec['elasticPolicy']['rdzvPort']}"
        assert container["ports"][0]["containerPort"] == spec["elasticPolicy"]["rdzvPort"]
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lq"
        assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
            {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["gpu-17", "rack2.node-3"]}]}]
        for key, value in (("group", group_of(cmd)), ("endpoint", endpoint), ("id", next(a for a in cmd if a.startswith("--rdzv-id="))),
                           ("port", spec["elasticPolicy"]["rdzvPort"]), ("name", job["metadata"]["name"])):
            seen[key].add(value)
    assert seen["group"] == {0, 1, 2} and seen["port"] == {29600, 29601, 29602}
    assert all(len(values) == 3 for values in seen.values()), seen
    assert lh_pod["spec"]["affinity"] == pod["affinity"]  # the lighthouse stays off the bad nodes too


def test_k8s_ft_with_the_sites_own_lighthouse(tmp_path, capsys):
    from tests.launch.k8s_schema import validate_manifest

    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", "--config", str(ft_config(tmp_path)),
                          "--", "--fault_tolerance.lighthouse=http://lh.infra.svc:29510")
    assert rc == 0, err
    docs = load_yaml_documents(out)
    validate_manifest(docs)
    assert [d["kind"] for d in docs] == ["ConfigMap", "PyTorchJob", "PyTorchJob"]
    for g, job in enumerate(docs[1:]):
        cmd = pod_of(job)["containers"][0]["command"]
        assert group_of(cmd) == g and cmd[-1] == "--fault_tolerance.lighthouse=http://lh.infra.svc:29510"


# --- errors: one line, exit 2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["--nodes", "3", "--gpus-per-node", "1"], "--nodes 3 does not split into fault_tolerance.replica_groups=2 equal groups"),
    (["--nodes", "1", "--gpus-per-node", "2"], "--nodes 1 does not split into fault_tolerance.replica_groups=2"),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "--fault_tolerance.replica_id=1"], "the launcher gives every replica group its own"),
    (["--nodes", "2", "--gpus-per-node", "1", "--lighthouse-port", "29401"], "collides with the replica groups' rendezvous ports 29400..29401"),
    (["--nodes", "2", "--gpus-per-node", "1", "--port", "65535"], "past 65535"),
    (["--nodes", "2", "--gpus-per-node", "1", "--", "--fault_tolerance.lighthouse=lh:1"], "must be http://HOST:PORT"),
    (["--nodes", "2", "--gpus-per-node", "8", "--", "--parallel.dp_shard=16"],
     "needs 16 processes but 1 node(s) x 8 GPU(s) = 8 processes per replica group (2 groups)"),
])
def test_bad_fault_tolerant_launches_are_one_line(tmp_path, capsys, argv, needle):
    config = ft_config(tmp_path)
    for target in ("slurm", "k8s"):
        rc, out, err = launch(capsys, target, "--config", str(config), *argv)
        assert rc == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.skipif(sys.platform != "linux", reason="the stub srun needs /proc and PR_SET_CHILD_SUBREAPER")
def test_ft_sbatch_without_a_lighthouse_binary_fails_before_any_group(tmp_path, capsys):
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "1", "--config", str(ft_config(tmp_path)),
                          "--lighthouse-port", str(free_port()))
    assert rc == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    state = tmp_path / "slurm"
    env = {**os.environ, **slurm_stub.install(tmp_path / "bin", state, hosts="localhost,127.0.0.1"),
           "TORCHFT_LIGHTHOUSE": str(tmp_path / "no-such-binary"), "SLURM_JOB_NODELIST": "n[0-1]", "SLURM_JOB_ID": "9"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "the torchft lighthouse did not start at http://localhost:" in proc.stderr, proc
    assert [line.split()[0] for line in (state / "steps.log").read_text().splitlines()] == ["lighthouse"]


def test_ft_launch_help_and_summary(tmp_path, capsys):
    out_file = tmp_path / "job.sbatch"
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "2", "--config", str(ft_config(tmp_path)), "--out", str(out_file))
    assert rc == 0 and out == "" and re.search(r"wrote .* \(4 node\(s\) x 2 GPU\(s\) in 2 replica groups, layout", err)
    assert os.access(out_file, os.X_OK)
    rc, _, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", str(ft_config(tmp_path, groups=1)))
    assert rc == 0 and "warning: fault_tolerance.replica_groups=1" in err
