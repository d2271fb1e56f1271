"""A Kubernetes manifest: a ConfigMap with the job's TOML and a Kubeflow PyTorchJob running torchrun.

Why PyTorchJob (Kubeflow Training Operator >= v1.7) rather than a JobSet: its `elasticPolicy` is torchrun's own
model. The operator creates one pod and one DNS name per node (`<name>-worker-<i>`), points every agent at the c10d
rendezvous on worker 0, and restarts a failed pod, whose agent rejoins the rendezvous so all agents restart their
workers from the newest checkpoint. A JobSet would need that headless service, endpoint and restart wiring by hand.

The YAML is written by a small block-style emitter below (standard library only); strings are JSON-quoted, which
is valid YAML, so no value can change meaning.
"""

from __future__ import annotations

import json

from gigafactory.launch.spec import NCCL_ENV, LaunchSpec

CONFIG_DIR = "/etc/gigafactory"
CONFIG_KEY = "job.toml"


class Literal(str):
    """A multi-line string written as a YAML literal block (`|`)."""


def _scalar(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    return json.dumps(str(value))


def _key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").replace(".", "").replace("/", "").isalnum() else json.dumps(key)


def _is_leaf(value) -> bool:
    return not isinstance(value, (dict, list)) or not value


def _leaf(value) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def _literal_ok(text: str) -> bool:
    lines = text.split("\n")
    return bool(text.strip()) and not lines[0][:1].isspace() and all(ch == "\t" or ch.isprintable() for line in lines for ch in line)


def _block(value, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, Literal) and _literal_ok(item):
                out.append(f"{pad}{_key(key)}: |")
                out += [f"{pad}  {line}" if line else "" for line in item.rstrip("\n").split("\n")]
            elif _is_leaf(item):
                out.append(f"{pad}{_key(key)}: {_leaf(item)}")
            else:
                out.append(f"{pad}{_key(key)}:")
                out += _block(item, indent + 2)
    else:
        for item in value:
            if _is_leaf(item):
                out.append(f"{pad}- {_leaf(item)}")
            else:
                sub = _block(item, indent + 2)
                sub[0] = f"{pad}- {sub[0][indent + 2:]}"
                out += sub
    return out


def to_yaml(*documents: dict) -> str:
    """Block-style YAML for one or more documents (separated by `---`)."""
    return "".join("---\n" + "\n".join(_block(doc, 0)) + "\n" for doc in documents)


def render_pytorchjob(spec: LaunchSpec) -> str:
    run_dir = f"{spec.mount}/{spec.cfg.logging.run_dir.rstrip('/').rsplit('/', 1)[-1] or spec.name}"
    config = [f"{CONFIG_DIR}/{CONFIG_KEY}"] if spec.config_text is not None else []
    shared = []  # the run directory and data cache live on the shared volume unless the extra flags say otherwise
    if not spec.has_train_flag("logging.run_dir"):
        shared += ["--logging.run_dir", run_dir]
    if not spec.has_train_flag("data.cache_dir"):
        shared += ["--data.cache_dir", f"{spec.mount}/.cache"]
    argv = ["train", *(["--config", *config] if config else []), *shared, *spec.train_args]
    command = [
        "torchrun", f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.gpus_per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={spec.name}-worker-0:{spec.port}", f"--rdzv-id={spec.name}", f"--max-restarts={spec.max_restarts}",
        "-m", "gigafactory.cli.main", *argv,
    ]
    mounts = [{"name": "runs", "mountPath": spec.mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "runs", "persistentVolumeClaim": {"claimName": spec.pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and data loaders need more than the 64 MiB default
    ]
    documents = []
    if spec.config_text is not None:
        config_map = f"{spec.name}-config"
        documents.append({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map, "labels": {"app.kubernetes.io/name": "gigafactory", "gigafactory/job": spec.name}},
            "data": {CONFIG_KEY: Literal(spec.config_text)},
        })
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": config_map}})
    container = {
        "name": "pytorch",  # the operator looks for this container name and its port name
        "image": spec.image or "gigafactory:latest",
        "command": command,
        "ports": [{"name": "pytorchjob-port", "containerPort": spec.port}],
        "env": [{"name": name, "value": default} for name, default, _ in NCCL_ENV],
        "resources": {"limits": {"nvidia.com/gpu": spec.gpus_per_node}},
        "volumeMounts": mounts,
    }
    documents.append({
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": spec.name, "labels": {"app.kubernetes.io/name": "gigafactory", "gigafactory/job": spec.name}},
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d", "rdzvPort": spec.port,
                # min = max: the parallel layout is fixed to nodes x GPUs, so the job never runs on fewer nodes.
                "minReplicas": spec.nodes, "maxReplicas": spec.nodes, "maxRestarts": spec.max_restarts,
            },
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": max(1, spec.max_restarts)},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": spec.nodes,
                    "restartPolicy": "OnFailure",
                    "template": {"spec": {"containers": [container], "volumes": volumes}},
                },
            },
        },
    })
    header = (
        f"# Generated by: {spec.command_line or 'gigafactory launch k8s'}\n"
        f"# {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s) = {spec.world_size} ranks; parallel layout {spec.layout}; "
        f"torchrun restarts: {spec.max_restarts}.\n"
        f"# Needs the Kubeflow Training Operator (>= v1.7) and a ReadWriteMany PVC named {spec.pvc!r} (run dir, checkpoints,\n"
        f"# data cache, mounted at {spec.mount}). Apply with: kubectl apply -f FILE. See docs/scale-out.md.\n"
    )
    return header + to_yaml(*documents)
