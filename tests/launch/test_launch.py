"""`gigafactory launch slurm|k8s`: generated files are valid and carry the right counts; bad input is one line, exit 2."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gigafactory.cli.main import main
from gigafactory.launch.k8s import Literal, to_yaml

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML is optional
    yaml = None

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
    if yaml is not None:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    # Without PyYAML: every scalar we emit is JSON; check the structure line by line at least.
    assert all(line.startswith(("#", "---", " ", "-")) or re.match(r"^[\w./-]+:", line) for line in text.splitlines() if line)
    pytest.skip("PyYAML not installed")


# --- Slurm -------------------------------------------------------------------------------------------------------


def test_sbatch_is_valid_bash_with_torchrun_rendezvous(tmp_path, capsys):
    config = write_config(tmp_path)
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "8", "--config", str(config),
                          "--max-restarts", "5", "--partition", "gpu", "--", "--training.steps", "1000")
    assert rc == 0, err
    script = tmp_path / "job.sbatch"
    script.write_text(out)
    subprocess.run(["bash", "-n", str(script)], check=True)

    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", out, re.M))
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
    assert "#SBATCH --time=2-00:00:00" in text


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
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][7:] == ["-m", "gigafactory.cli.main", "train", "--data.cache_dir", "/runs/.cache", "--logging.run_dir", "/runs/mine"]
    assert job["metadata"]["name"] == "gigafactory" and container["image"] == "gigafactory:latest"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "shared"


def test_yaml_emitter_round_trips_awkward_strings():
    if yaml is None:
        pytest.skip("PyYAML not installed")
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
    (["--nodes", "1", "--gpus-per-node", "1", "--config", "/nonexistent/job.toml"], "file not found"),
    (["--nodes", "1", "--gpus-per-node", "1", "--max-restarts", "-1"], "--max-restarts -1 must be >= 0"),
    (["--nodes", "1", "--gpus-per-node", "1", "--name", "Bad_Name"], "must be a DNS label"),
    (["--nodes", "1", "--gpus-per-node", "1", "--time", "soon"], "is not a Slurm time limit"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--nproc", "4"], "conflicts with the launcher"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--trainin.steps", "4"], "unknown train flag"),
    (["--nodes", "1", "--gpus-per-node", "1", "--", "--training.steps", "many"], "config key 'training.steps' expects int"),
])
def test_bad_inputs_are_one_line(capsys, argv, needle):
    rc, out, err = launch(capsys, "k8s", *argv)
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
    with pytest.raises(SystemExit) as exc:
        main(["launch", "slurm", "--gpus-per-node", "8"])  # --nodes missing
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["launch", "pbs", "--nodes", "1", "--gpus-per-node", "8"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_tp_across_nodes_warns(tmp_path, capsys):
    config = write_config(tmp_path, parallel="dp_shard = -1\ntp = 2")
    rc, out, err = launch(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "1", "--config", str(config))
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert err.startswith("warning: parallel.tp=2 does not fit in one node of 1 GPUs")


# --- opt-in: really run the generated sbatch (stub srun/scontrol, 1 node x 2 gloo ranks, ~10 s) -------------------


@pytest.mark.skipif(not os.environ.get("GIGAFACTORY_LAUNCH_E2E"), reason="set GIGAFACTORY_LAUNCH_E2E=1 to train through the sbatch script")
def test_sbatch_trains_end_to_end_on_cpu(tmp_path, capsys):
    corpus = next(Path(__file__).resolve().parents[2].glob("gigafactory/data/corpus/*.jsonl.gz"))
    with gzip.open(corpus, "rt") as f:
        docs = [json.loads(line)["text"][:400] for line in itertools.islice(f, 60)]
    inputs = tmp_path / "small.jsonl"
    inputs.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    extra = ('\n[training]\nsteps = 2\nbatch_size = 2\neval_every = 0\ndtype = "fp32"\ndevice = "cpu"\n'
             '[checkpoint]\nevery = 0\n')
    config = write_config(tmp_path, parallel="dp_shard = -1", name="e2e.toml", extra=extra)
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    rc, _, err = launch(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "2", "--config", str(config), "--out", str(script),
                        "--max-restarts", "0", "--", "--logging.run_dir", str(run_dir), "--logging.tensorboard", "false",
                        "--logging.progress", "false", "--logging.log_every", "1",
                        "--data.inputs", str(inputs), "--data.cache_dir", str(cache))
    assert rc == 0, err
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec \"$@\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
