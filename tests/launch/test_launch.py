"""`gigafactory launch slurm|k8s`: generated files are valid and carry the right counts; bad input is one line, exit 2.

Validity is checked with real rules: #SBATCH lines as sbatch parses them (tests/launch/sbatch_rules.py, and the real
sbatch when Debian's slurm-client is installed), manifests against the Kubernetes and Kubeflow schemas
(tests/launch/k8s_schema.py). The sbatch script is also run, under a stub srun/scontrol, to see its signals work.
"""

from __future__ import annotations

import json
import os
import stat
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gigafactory.cli.main import main
from gigafactory.launch.k8s import Literal, to_yaml
from tests.launch import slurm_stub
from tests.launch.sbatch_rules import real_sbatch_errors, sbatch_directives

TINY = """\
[model]
vocab_size = 512
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
max_seq_len = 64
n_experts = 4
top_k = 2
moe_ffn_dim = 64

[data]
seq_len = 32

[parallel]
{parallel}

[logging]
run_dir = "runs/tiny-job"
"""


def write_config(tmp_path: Path, parallel: str = "dp_shard = -1\ntp = 2", name: str = "tiny job.toml", extra: str = "") -> Path:
    path = tmp_path / name
    path.write_text(TINY.format(parallel=parallel) + extra)
    return path


def launch(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["launch", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def load_yaml_documents(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def check_sbatch(script: str, work: Path) -> dict[str, str | None]:
    """#SBATCH options as sbatch reads them (AssertionError on any it would reject); the real sbatch too if here."""
    directives = dict(sbatch_directives(script))
    path = work / "check.sbatch"
    path.write_text(script)
    assert real_sbatch_errors(path, work) in (None, ""), real_sbatch_errors(path, work)
    return directives


def pod_of(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


# --- Slurm -------------------------------------------------------------------------------------------------------


def test_sbatch_is_valid_bash_with_torchrun_rendezvous(tmp_path, capsys):
    config = write_config(tmp_path)
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "8", "--config", str(config),
                          "--max-restarts", "5", "--partition", "gpu", "--", "--training.steps", "1000")
    assert rc == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    subprocess.run(["bash", "-n", str(script)], check=True)

    sbatch = check_sbatch(out, tmp_path)
    assert sbatch["nodes"] == "4" and sbatch["ntasks-per-node"] == "1" and sbatch["gpus-per-node"] == "8"
    assert "exclusive" in sbatch and sbatch["time"] == "24:00:00" and "%j" in sbatch["output"] and sbatch["partition"] == "gpu"
    for flag in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d", '--rdzv-endpoint="$RDZV_HOST:$RDZV_PORT"',
                 '--rdzv-id="$SLURM_JOB_ID"', "--max-restarts=5"):
        assert flag in out, flag
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in out
    assert "srun --nodes=4 --ntasks-per-node=1" in out and "--kill-on-bad-exit=1" in out
    assert "export NCCL_DEBUG=" in out and "TORCH_NCCL_ASYNC_ERROR_HANDLING" in out
    # the config path has a space: it must reach train as one argument
    assert f"train --config '{config.resolve()}' --training.steps 1000" in out
    assert "parallel layout dp_shard=16 x tp=2" in out


def test_sbatch_runs_under_stub_slurm_and_passes_arguments_intact(tmp_path, capsys):
    """Run the script with fake scontrol/srun/python: the worker command line arrives exactly as intended."""
    config = write_config(tmp_path)
    rc, out, _ = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "4", "--config", str(config),
                        "--", "--logging.run_dir", "runs/with space", "--optimizer.lr", "1e-3")
    assert rc == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    (bin_dir / "fakepython").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'nccl': os.environ.get('NCCL_DEBUG')}}, open({str(record)!r}, 'w'))\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "fakepython"),
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "777", "NCCL_DEBUG": "INFO"}
    env.pop("NCCL_SOCKET_IFNAME", None)
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    got = json.loads(record.read_text())
    assert got["nccl"] == "INFO"  # a site's own value wins over the script's default
    assert got["argv"] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-a:29400", "--rdzv-id=777", "--max-restarts=3",
        "-m", "gigafactory.cli.main", "train", "--config", str(config.resolve()),
        "--logging.run_dir", "runs/with space", "--optimizer.lr", "1e-3",
    ]


def test_sbatch_with_image_uses_pyxis_and_out_file(tmp_path, capsys):
    config = write_config(tmp_path, name="job.toml")
    out_file = tmp_path / "sub" / "job.sbatch"
    rc, out, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "2", "--config", str(config),
                          "--image", "nvcr.io/x/gf:1", "--out", str(out_file), "--name", "my-run", "--time", "2-00:00:00")
    assert rc == 0 and out == ""
    assert err.strip().startswith("wrote ") and "sbatch" in err
    text = out_file.read_text()
    assert os.access(out_file, os.X_OK)
    subprocess.run(["bash", "-n", str(out_file)], check=True)
    assert "--container-image=nvcr.io/x/gf:1" in text and "#SBATCH --job-name=my-run" in text
    assert check_sbatch(text, tmp_path)["time"] == "2-00:00:00"


def test_sbatch_stops_before_the_time_limit_and_requeues(tmp_path, capsys):
    """Before: no --signal, no --requeue: a time limit or a lost node ended the job and lost up to a checkpoint
    interval. Now the batch shell is warned term_grace_s + 30 s ahead, the job may be requeued, the log is appended
    to across requeues, and torchrun waits for the ranks' save instead of its default 30 s."""
    config = write_config(tmp_path, name="job.toml", extra="\n[resilience]\nterm_grace_s = 300\n")
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", str(config), "--time", "1-00:00")
    assert rc == 0, err
    sbatch = check_sbatch(out, tmp_path)
    assert sbatch["signal"] == "B:USR1@330" and "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert 'export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-310}"' in out
    assert "trap on_time_limit USR1" in out and 'scontrol requeue "$SLURM_JOB_ID"' in out


def test_sbatch_default_run_dir_is_the_jobs_own(tmp_path, capsys):
    """Before: without logging.run_dir every job wrote runs/grok-tiny and resumed another job's checkpoints."""
    config = tmp_path / "moe-a.toml"
    config.write_text(TINY.format(parallel="dp_shard = -1").replace('[logging]\nrun_dir = "runs/tiny-job"\n', ""))
    _, out, _ = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "2", "--config", str(config))
    assert f"train --config {config.resolve()} --logging.run_dir runs/moe-a" in out
    _, out, _ = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "2", "--", "--preset", "grok-1b-moe")
    assert "train --logging.run_dir runs/grok-1b-moe --preset grok-1b-moe" in out and "--job-name=grok-1b-moe" in out
    _, out, _ = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "2", "--run-dir", "/scratch/me/a")
    assert "train --logging.run_dir /scratch/me/a" in out


FAKE_RANK = """\
import os, signal, sys, time
from pathlib import Path
state = Path(os.environ["STUB_SLURM_DIR"])
node = os.environ["SLURM_NODEID"]
def stop(signum, frame):
    (state / f"sigterm{node}").write_text("")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
(state / f"started{node}").write_text(" ".join(sys.argv[1:]))
time.sleep(60)
sys.exit(3)
"""


def start_sbatch_under_stub(tmp_path: Path, capsys) -> tuple[subprocess.Popen, Path]:
    """The generated 2-node script under the stub srun/scontrol, each "node" a fake rank that records SIGTERM."""
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "1", "--name", "sig")
    assert rc == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    fake = tmp_path / "fakepython"
    fake.write_text(f"#!{sys.executable}\n{FAKE_RANK}")
    fake.chmod(0o755)
    state = tmp_path / "slurm"
    env = {**os.environ, **slurm_stub.install(tmp_path / "bin", state, hosts="node-a,node-b"),
           "PYTHON": str(fake), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "777"}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not all((state / f"started{n}").exists() for n in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.05)
    return proc, state


def test_sbatch_time_limit_sends_sigterm_to_every_node_then_requeues(tmp_path, capsys):
    """Slurm's USR1 (the --signal warning) reaches the batch shell: every rank on every node gets SIGTERM, the script
    waits for them, then requeues the job (`scontrol requeue`) so it resumes from the checkpoint they saved."""
    proc, state = start_sbatch_under_stub(tmp_path, capsys)
    try:
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert (state / "sigterm0").exists() and (state / "sigterm1").exists(), out
    assert (state / "scontrol.log").read_text() == "requeue 777\n"
    assert "time limit" in out and "requeued" in out


def test_sbatch_scancel_term_is_not_requeued(tmp_path, capsys):
    """scancel (and preemption) send TERM to the batch shell and to every task themselves: the script must neither
    die (that would kill the step before the ranks save) nor forward a second TERM nor requeue a cancelled job."""
    proc, state = start_sbatch_under_stub(tmp_path, capsys)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None and not list(state.glob("sigterm*"))  # still waiting; nothing forwarded
        srun_pid = next(p for p in slurm_stub.descendants(proc.pid) if "srun" in Path(f"/proc/{p}/cmdline").read_text())
        os.kill(srun_pid, signal.SIGTERM)  # what slurmctld does to the step on scancel
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert (state / "sigterm0").exists() and (state / "sigterm1").exists()
    assert not (state / "scontrol.log").exists()


@pytest.mark.parametrize("variant", [
    [],
    ["--partition", "gpu", "--account", "proj-1", "--time", "90"],
    ["--image", "nvcr.io/x/gf:1", "--time", "2-12", "--max-restarts", "0"],
])
def test_sbatch_directives_parse_as_sbatch_parses_them(tmp_path, capsys, variant):
    config = write_config(tmp_path)
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "4", "--config", str(config), *variant)
    assert rc == 0, err
    check_sbatch(out, tmp_path)
    subprocess.run(["bash", "-n"], input=out, text=True, check=True)


@pytest.mark.parametrize("text,seconds", [
    ("90", 5400), ("90:30", 5430), ("1:02:03", 3723), ("2-12", 216000), ("2-12:30", 217800), ("1-00:00:01", 86401),
    ("UNLIMITED", 0), ("soon", None), ("1:2:3:4", None), ("-5", None),
])
def test_slurm_time_limits_parse_as_slurm_reads_them(text, seconds):
    from gigafactory.launch.spec import slurm_time_seconds

    assert slurm_time_seconds(text) == seconds


def test_sbatch_rules_reject_what_sbatch_rejects():
    """The checker itself: each line below is rejected by the real sbatch 22.05 too."""
    head = "#!/bin/bash\n"
    for bad in ("#SBATCH --signal=B:USR1@70000", "#SBATCH --signal=USR9", "#SBATCH --time=1:2:3:4", "#SBATCH --requeue=yes",
                "#SBATCH --bogus=1", "#SBATCH --nodes=zero"):
        with pytest.raises(AssertionError):
            sbatch_directives(head + bad + "\n")
    with pytest.raises(AssertionError, match="after the first command"):
        sbatch_directives(head + "set -e\n#SBATCH --requeue\n")


# --- Kubernetes --------------------------------------------------------------------------------------------------


def test_k8s_pytorchjob_has_replicas_gpus_rendezvous_and_shared_volume(tmp_path, capsys):
    config = write_config(tmp_path, parallel="dp_replicate = 2\ndp_shard = -1\nep = 2", name="moe.toml")
    rc, out, err = launch(capsys, "k8s", "--nodes", "3", "--gpus-per-node", "4", "--config", str(config),
                          "--image", "registry/gf:v1", "--max-restarts", "7", "--", "--training.steps", "50")
    assert rc == 0, err
    docs = load_yaml_documents(out)
    config_map, job = docs
    assert config_map["kind"] == "ConfigMap" and config_map["data"]["job.toml"] == config.read_text()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob" and job["metadata"]["name"] == "moe"
    spec = job["spec"]
    assert spec["elasticPolicy"] == {"rdzvBackend": "c10d", "rdzvPort": 29400, "minReplicas": 3, "maxReplicas": 3, "maxRestarts": 7}
    assert spec["nprocPerNode"] == "4"
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3 and list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch" and container["image"] == "registry/gf:v1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert {"name": "pytorchjob-port", "containerPort": 29400} in container["ports"]
    cmd = container["command"]
    assert cmd[:7] == ["torchrun", "--nnodes=3", "--nproc-per-node=4", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=moe-worker-0:29400", "--rdzv-id=moe", "--max-restarts=7"]
    # the config's own run_dir "runs/tiny-job", on the shared volume
    assert cmd[7:] == ["-m", "gigafactory.cli.main", "train", "--config", "/etc/gigafactory/job.toml",
                       "--logging.run_dir", "/runs/tiny-job", "--data.cache_dir", "/runs/.cache", "--training.steps", "50"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "gigafactory-runs"
    assert volumes["config"]["configMap"]["name"] == "moe-config"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/runs", "/dev/shm", "/etc/gigafactory"}
    assert {e["name"] for e in container["env"]} >= {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def test_k8s_without_config_and_with_own_run_dir(capsys):
    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", "--pvc", "shared",
                          "--", "--logging.run_dir", "/runs/mine")
    assert rc == 0, err
    (job,) = load_yaml_documents(out)
    container = pod_of(job)["containers"][0]
    assert container["command"][7:] == ["-m", "gigafactory.cli.main", "train", "--data.cache_dir", "/runs/.cache", "--logging.run_dir", "/runs/mine"]
    assert job["metadata"]["name"] == "grok-tiny" and container["image"] == "gigafactory:latest"
    assert pod_of(job)["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"


def k8s_run_dir(capsys, *argv: str) -> tuple[str, str]:
    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", *argv)
    assert rc == 0, err
    cmd = pod_of(load_yaml_documents(out)[-1])["containers"][0]["command"]
    return cmd[cmd.index("--logging.run_dir") + 1], err


def test_k8s_run_dir_is_the_jobs_own(tmp_path, capsys):
    """Before: /runs/grok-tiny for every job whatever its model or name, so two jobs resumed each other's checkpoints.
    Now: named after the job (config file, else model), or set with --run-dir (relative = on the volume)."""
    plain = TINY.format(parallel="dp_shard = -1").replace('[logging]\nrun_dir = "runs/tiny-job"\n', "")
    (tmp_path / "a.toml").write_text(plain)
    (tmp_path / "b.toml").write_text(plain)
    assert k8s_run_dir(capsys, "--config", str(tmp_path / "a.toml"))[0] == "/runs/a"
    assert k8s_run_dir(capsys, "--config", str(tmp_path / "b.toml"))[0] == "/runs/b"
    assert k8s_run_dir(capsys, "--", "--preset", "grok-1b-moe")[0] == "/runs/grok-1b-moe"
    assert k8s_run_dir(capsys)[0] == "/runs/grok-tiny"
    assert k8s_run_dir(capsys, "--name", "exp-7")[0] == "/runs/exp-7"
    assert k8s_run_dir(capsys, "--run-dir", "sweeps/lr-3e-4")[0] == "/runs/sweeps/lr-3e-4"
    assert k8s_run_dir(capsys, "--run-dir", "/runs/x")[0] == "/runs/x"
    run_dir, err = k8s_run_dir(capsys, "--run-dir", "/tmp/x")
    assert run_dir == "/tmp/x" and "not on the shared volume" in err


def test_k8s_restart_cleanup_and_gang_policies(tmp_path, capsys):
    """Before: backoffLimit = max(1, restarts) < pods (one failure that restarts every pod failed the job),
    cleanPodPolicy None (pods kept their GPUs after the job), no gang scheduling, 30 s to save on eviction."""
    config = write_config(tmp_path, parallel="dp_shard = -1", name="g.toml", extra="\n[resilience]\nterm_grace_s = 200\n")
    rc, out, err = launch(capsys, "k8s", "--nodes", "8", "--gpus-per-node", "8", "--config", str(config), "--max-restarts", "2")
    assert rc == 0, err
    job = load_yaml_documents(out)[-1]
    run = job["spec"]["runPolicy"]
    workers = job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert workers == 8 and run["backoffLimit"] == 8 * 2 and run["backoffLimit"] >= workers
    assert run["cleanPodPolicy"] in ("Running", "All")
    assert run["schedulingPolicy"] == {"minAvailable": workers}
    assert pod_of(job)["terminationGracePeriodSeconds"] == 230 and "schedulerName" not in pod_of(job)
    env = {e["name"]: e["value"] for e in pod_of(job)["containers"][0]["env"]}
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "210"
    _, out, _ = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", "--max-restarts", "0")
    assert load_yaml_documents(out)[-1]["spec"]["runPolicy"]["backoffLimit"] == 2
    # a named gang scheduler, its queue, and Kueue
    rc, out, err = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1", "--queue", "research", "--scheduler", "volcano",
                          "--kueue-queue", "team-a")
    assert rc == 0, err
    job = load_yaml_documents(out)[-1]
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 2, "queue": "research"}
    assert pod_of(job)["schedulerName"] == "volcano" and job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


@pytest.mark.parametrize("variant", [
    [],
    ["--config", "CONFIG", "--queue", "q", "--scheduler", "volcano", "--kueue-queue", "lq", "--image", "r/gf:1"],
    ["--run-dir", "/data/x", "--pvc", "other", "--port", "29500", "--", "--training.steps", "5"],
])
def test_k8s_manifest_passes_kubernetes_and_kubeflow_schemas(tmp_path, capsys, variant):
    from tests.launch.k8s_schema import validate_manifest

    config = write_config(tmp_path, parallel="dp_shard = -1")
    argv = [str(config) if a == "CONFIG" else a for a in variant]
    rc, out, err = launch(capsys, "k8s", "--nodes", "4", "--gpus-per-node", "8", *argv)
    assert rc == 0, err
    docs = load_yaml_documents(out)
    validate_manifest(docs)
    assert [d["kind"] for d in docs] == (["ConfigMap", "PyTorchJob"] if "--config" in argv else ["PyTorchJob"])


def test_k8s_schema_check_catches_mistakes(tmp_path, capsys):
    """The validator rejects what the operator or the API server would: a wrong enum, a misspelt field, a bad type."""
    from tests.launch.k8s_schema import validate_manifest

    _, out, _ = launch(capsys, "k8s", "--nodes", "2", "--gpus-per-node", "1")
    for path, value in ((("spec", "runPolicy", "cleanPodPolicy"), "Nothing"), (("spec", "runPolicy", "backofLimit"), 3),
                        (("spec", "nprocPerNode"), 1), (("spec", "pytorchReplicaSpecs", "Worker", "template", "spec", "terminationGracePeriod"), 5)):
        job = load_yaml_documents(out)[-1]
        node = job
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(Exception, match="is not one of|unexpected|is not of type"):
            validate_manifest([job])


def test_yaml_emitter_round_trips_awkward_strings():
    doc = {
        "a": "x: y # z", "b": "yes", "c": "", "d": "multi\nline", "e": "ünïcode \"q\" 'q' \\ /", "f": [], "g": {},
        "h": [{"k": 1, "l": [True, None]}, "s", [1, 2]], "weird key": 3,
        "toml": Literal('[model]\npreset = "grok-1"  # c\n\n\tx = 1\n'),
        "lead": Literal("  starts with spaces\n"), "ctrl": Literal("a\rb\n"),
    }
    back = yaml.safe_load(to_yaml(doc))
    expected = dict(doc, toml=str(doc["toml"]), lead=str(doc["lead"]), ctrl=str(doc["ctrl"]))
    assert back == expected


# --- errors: one line on stderr, exit code 2 ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel,needle", [
    ("dp_shard = 4\ntp = 2", "parallel layout dp_shard=4 x tp=2 needs 8 processes but 2 node(s) x 8 GPU(s) = 16 processes"),
    ("dp_shard = -1\ntp = 4\nep = 8", "does not divide 2 node(s) x 8 GPU(s) = 16 processes"),
    ("dp_shard = -1\ntp = -1", "infer at most one"),
    ("dp_shard = -1\ntp = 8", "parallel.tp=8 must divide model.n_heads=4"),
    ("dp_shard = 16\nep = 2", "set parallel.dp_shard = 8"),  # a `gigafactory plan` snippet, whose ep lives inside dp_shard
])
def test_layout_errors_are_one_line(tmp_path, capsys, parallel, needle):
    config = write_config(tmp_path, parallel=parallel)
    rc, out, err = launch(capsys, "slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", str(config))
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


@pytest.mark.parametrize("argv,needle", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes 0 must be >= 1"),
    (["--nodes", "2", "--gpus-per-node", "0"], "--gpus-per-node 0 must be >= 1"),
    (["--nodes", str(10**30), "--gpus-per-node", "8"], "must be at most 100,000"),
    (["--nodes", "1", "--gpus-per-node", "1", "--config", "/nonexistent/job.toml"], "file not found"),
    (["--nodes", "1", "--gpus-per-node", "1", "--max-restarts", "-1"], "--max-restarts -1 must be >= 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--name", "Bad_Name"], "must be a DNS label"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "soon"], "is not a Slurm time limit"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--nproc", "4"], "conflicts with the launcher"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--trainin.steps", "4"], "unknown train flag"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--training.steps", "many"], "config key 'training.steps' expects int"),
    (["--nodes", "1", "--gpus-per-node", "1", "--run-dir", "a", "--", "--logging.run_dir", "b"], "keep one"),
    (["--nodes", "1", "--gpus-per-node", "1", "--queue", "Bad Queue"], "--queue 'Bad Queue' must be a Kubernetes name"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "2"], "--time 2 leaves no training time: the job is told to stop 150 s"),
    # issue 18: a newline would inject its own #SBATCH directive / script or YAML line
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--partition", "gpu\n#SBATCH --exclusive"], "--partition 'gpu\\n#SBATCH --exclusive' contains a newline"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--account", "a\rb"], "--account 'a\\rb' contains a newline"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--image", "img\n evil: true"], "--image 'img\\n evil: true' contains a newline"),
    (["--nodes", "1", "--gpus-per-node", "1", "--image", "img\n evil: true"], "--image 'img\\n evil: true' contains a newline"),
    (["--nodes", "1", "--gpus-per-node", "1", "--run-dir", "runs/a\nb"], "--run-dir 'runs/a\\nb' contains a newline"),
    (["slurm", "--nodes", "1", "--gpus-per-node", "1", "--", "--logging.run_dir", "x\ny"], "arguments after `--` 'x\\ny' contains a newline"),
])
def test_bad_inputs_are_one_line(capsys, argv, needle):
    target, argv = (argv[0], argv[1:]) if argv[0] == "slurm" else ("k8s", argv)
    rc, out, err = launch(capsys, target, *argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err, err


def test_broken_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[parallel\ntp = 2\n")
    rc, _, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", str(bad))
    assert rc == 2 and err.count("\n") == 1 and "not valid TOML" in err
    bad.write_text("[parallel]\ntpp = 2\n")
    rc, _, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", str(bad))
    assert rc == 2 and err.count("\n") == 1 and "parallel.tpp" in err


def test_usage_errors_exit_2(capsys):
    assert main(["launch", "slurm", "--gpus-per-node", "8"]) == 2  # --nodes missing
    assert capsys.readouterr().err == "error: launch slurm: give --nodes (or --serve for a serving fleet)\n"
    with pytest.raises(SystemExit) as exc:
        main(["launch", "pbs", "--nodes", "1", "--gpus-per-node", "8"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_tp_across_nodes_warns(tmp_path, capsys):
    config = write_config(tmp_path, parallel="dp_shard = -1\ntp = 2")
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "1", "--config", str(config))
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert err.startswith("warning: parallel.tp=2 does not fit in one node of 1 GPUs")
