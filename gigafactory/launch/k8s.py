"""A Kubernetes manifest: a ConfigMap with the job's TOML and a Kubeflow PyTorchJob running torchrun.

Why PyTorchJob (Kubeflow Training Operator >= v1.7) rather than a JobSet: its `elasticPolicy` is torchrun's own
model. The operator creates one pod and one DNS name per node (`<name>-worker-<i>`), points every agent at the c10d
rendezvous on worker 0, and restarts a failed pod, whose agent rejoins the rendezvous so all agents restart their
workers from the newest checkpoint (with torch 2.13 a rejoin can stall 60 s and fall back to restarting every
container; docs/scale-out.md, section 5). A JobSet would need that service, endpoint and restart wiring by hand.

Why these run-policy values (docs/scale-out.md, section 4):
- `schedulingPolicy.minAvailable` = every pod: gang scheduling. With the operator's gang scheduler on (Volcano or
  scheduler-plugins) it creates a PodGroup of that size, so no pod holds a GPU while the others cannot be placed.
- `backoffLimit` counts container restarts summed over all pods, and one failure that spends every agent's
  torchrun budget restarts every pod: nodes x max(1, restarts) lets the job survive `restarts` such rounds.
- `cleanPodPolicy: Running`: when the job ends, pods still running (or pending) are deleted, freeing their GPUs;
  finished pods stay for their logs.
- `terminationGracePeriodSeconds`: an eviction's SIGTERM reaches torchrun (the container's PID 1), which forwards it
  to the ranks; they save within resilience.term_grace_s before the kubelet's SIGKILL.

Written with PyYAML's safe dumper (the config TOML as a literal block), so every value round-trips exactly.
"""

from __future__ import annotations

import yaml

from gigafactory.launch.preflight import apply_to_pytorchjob, rendezvous_documents
from gigafactory.launch.spec import NCCL_ENV, LaunchSpec, shutdown_env

CONFIG_DIR = "/etc/gigafactory"
CONFIG_KEY = "job.toml"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class Literal(str):
    """A multi-line string written as a YAML literal block (`|`) where YAML allows one."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(Literal, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", str(text), style="|"))


def to_yaml(*documents: dict) -> str:
    """Block-style YAML for one or more documents, each starting with `---`, keys in the order given."""
    return yaml.dump_all(documents, Dumper=_Dumper, explicit_start=True, sort_keys=False, default_flow_style=False,
                         allow_unicode=True, width=1 << 16)


def _train_argv(spec: LaunchSpec) -> list[str]:
    config = ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"] if spec.config_text is not None else []
    shared = []  # the run directory and data cache live on the shared volume unless the extra flags say otherwise
    if not spec.has_train_flag("logging.run_dir"):
        shared += ["--logging.run_dir", spec.pod_run_dir]
    if not spec.has_train_flag("data.cache_dir"):
        shared += ["--data.cache_dir", f"{spec.mount}/.cache"]
    return ["train", *config, *shared, *spec.train_args]


def labels(spec: LaunchSpec) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gigafactory", "gigafactory/job": spec.name}


def node_affinity(hosts: list[str]) -> dict:
    """--exclude: the pod may not be scheduled on these nodes (hard rule; a running pod is not evicted)."""
    term = {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": list(hosts)}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def config_map(spec: LaunchSpec) -> dict | None:
    """The job's TOML, mounted read-only at CONFIG_DIR in every pod (None without --config)."""
    if spec.config_text is None:
        return None
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{spec.name}-config", "labels": labels(spec)},
        "data": {CONFIG_KEY: Literal(spec.config_text)},
    }


def pytorchjob(spec: LaunchSpec, *, name: str, nodes: int, port: int, extra_argv: tuple[str, ...] = (),
               extra_labels: dict[str, str] | None = None) -> dict:
    """One PyTorchJob of `nodes` pods running torchrun with rendezvous on its worker 0 (the whole job, or one
    replica group: `extra_argv` then makes it that group, `extra_labels` tell its pods apart)."""
    command = [
        "torchrun", f"--nnodes={nodes}", f"--nproc-per-node={spec.gpus_per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={name}-worker-0:{port}", f"--rdzv-id={name}", f"--max-restarts={spec.max_restarts}",
        "-m", "gigafactory.cli.main", *_train_argv(spec), *extra_argv,
    ]
    pod_labels = dict(labels(spec), **(extra_labels or {}))
    mounts = [{"name": "runs", "mountPath": spec.mount}, {"name": "dshm", "mountPath": "/dev/shm"}]
    volumes = [
        {"name": "runs", "persistentVolumeClaim": {"claimName": spec.pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and data loaders need more than the 64 MiB default
    ]
    if spec.config_text is not None:
        mounts.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
        volumes.append({"name": "config", "configMap": {"name": f"{spec.name}-config"}})
    container = {
        "name": "pytorch",  # the operator looks for this container name and its port name
        "image": spec.image or "gigafactory:latest",
        "command": command,
        "ports": [{"name": "pytorchjob-port", "containerPort": port}],
        "env": [{"name": env, "value": value} for env, value, _ in (*NCCL_ENV, shutdown_env(spec))],
        "resources": {"limits": {"nvidia.com/gpu": spec.gpus_per_node}},
        "volumeMounts": mounts,
    }
    pod = {"terminationGracePeriodSeconds": spec.stop_lead_s}
    if spec.scheduler:
        pod["schedulerName"] = spec.scheduler
    if spec.exclude:
        pod["affinity"] = node_affinity(spec.exclude)
    pod.update(containers=[container], volumes=volumes)
    scheduling = {"minAvailable": nodes}  # gang: all pods or none
    if spec.queue:
        scheduling["queue"] = spec.queue
    job_labels = dict(pod_labels, **({KUEUE_LABEL: spec.kueue_queue} if spec.kueue_queue else {}))
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": job_labels},
        "spec": {
            "nprocPerNode": str(spec.gpus_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d", "rdzvPort": port,
                # min = max: the parallel layout is fixed to nodes x GPUs, so the job never runs on fewer nodes.
                "minReplicas": nodes, "maxReplicas": nodes, "maxRestarts": spec.max_restarts,
            },
            "runPolicy": {
                "cleanPodPolicy": "Running",
                "backoffLimit": nodes * max(1, spec.max_restarts),
                "schedulingPolicy": scheduling,
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": nodes,
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": pod_labels}, "spec": pod},
                },
            },
        },
    }


def render_pytorchjob_plain(spec: LaunchSpec) -> str:
    """The manifest of a job without fault tolerance (launch/__init__.py picks k8s_ft's for one with it)."""
    job = pytorchjob(spec, name=spec.name, nodes=spec.nodes, port=spec.port)
    documents = [doc for doc in (config_map(spec), job) if doc]
    if spec.health:  # docs/operations.md: health initContainer, spares, the rendezvous store in its own pod
        apply_to_pytorchjob(spec, job, spec.nodes)
        documents += rendezvous_documents(spec, spec.port, labels(spec))
    return header(spec) + to_yaml(*documents)


def header(spec: LaunchSpec, extra: str = "") -> str:
    """The comment on top of the manifest; `extra` (whole comment lines) follows the job's shape."""
    return (
        f"# Generated by: {spec.command_line or 'gigafactory launch k8s'}\n"
        f"# {spec.nodes} node(s) x {spec.gpus_per_node} GPU(s) = {spec.world_size} ranks; parallel layout {spec.layout}; "
        f"torchrun restarts: {spec.max_restarts}.\n"
        f"{extra}"
        f"# Needs the Kubeflow Training Operator (>= v1.7) and a ReadWriteMany PVC named {spec.pvc!r} (run dir, checkpoints,\n"
        f"# data cache, mounted at {spec.mount}). Gang scheduling needs the operator's gang scheduler (Volcano or\n"
        f"# scheduler-plugins) or Kueue. Apply with: kubectl apply -f FILE. See docs/scale-out.md.\n"
    )
