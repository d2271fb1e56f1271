"""`gigafactory launch k8s`: the PyTorchJob manifest carries the right counts, passes the Kubernetes and Kubeflow
schemas (tests/launch/k8s_schema.py), names its run directory after the job, and its YAML round-trips."""

from __future__ import annotations

import pytest
import yaml

from gigafactory.launch.k8s import Literal, to_yaml
from tests.launch.launch_helpers import TINY, launch, load_yaml_documents, pod_of, write_config


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
