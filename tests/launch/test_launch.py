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
from gigafactory.cli.main import main
from tests.launch import slurm_stub
from tests.launch.launch_helpers import TINY, check_sbatch, launch, write_config
from tests.launch.sbatch_rules import sbatch_directives

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
