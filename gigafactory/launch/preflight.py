"""`launch --health [--spares K]`: the job files run `gigafactory health` on every node before training, drop the
nodes that fail it and train on healthy ones, spares standing in for the dropped (issue 14; docs/operations.md).

Slurm: the job allocates nodes + K; one srun step runs the health check on every allocated node at once (each on its
own GPUs, with a time limit, so a hung node counts as failed); `gigafactory health --pick N` then judges all the
per-node reports together against the fleet median, also drops nodes listed in the run directory's
bad_nodes.json (stragglers the trainer named, `resilience.straggler_policy=exclude`), and the torchrun step runs on
the first N healthy nodes (--nodelist). A requeue reruns the whole script, so every restart is checked again.

Kubernetes: every worker pod gets an initContainer running the health check on its node; a failure keeps the pod
from starting (the kubelet retries it, the training container never runs there). With K spares the PyTorchJob runs
N + K pods while torchrun keeps --nnodes=N: the first N agents to reach the rendezvous train, the others wait in
its redundancy list and replace a failed node at the next rendezvous. Because any pod, worker-0 included, may be
the one held back, the c10d rendezvous store runs in a small Deployment of its own behind a Service.
"""

from __future__ import annotations

import copy
import shlex

HEALTH_TIMEOUT_S = 900  # a node whose check has not finished by then is dropped (GIGAFACTORY_HEALTH_TIMEOUT)

SLURM_BLOCK = """\

# Pre-flight (docs/operations.md): every allocated node ({alloc} = {nodes} + {spares} spare(s)) runs `gigafactory health`
# on its own GPUs. A node that fails it, does not finish within GIGAFACTORY_HEALTH_TIMEOUT s, is slower than the
# fleet median by the health check's margin, or is listed in the run directory's bad_nodes.json (a straggler named
# by an earlier attempt) is dropped; the job trains on the first {nodes} healthy nodes and stops if there are fewer.
PYTHON="${{PYTHON:-python3}}"
RUN_DIR={run_dir}
HEALTH_DIR="$RUN_DIR/health/job-$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}"
mkdir -p "$HEALTH_DIR"
ALL_NODES=$(IFS=,; echo "${{NODES[*]}}")
srun --nodes=${{#NODES[@]}} --ntasks=${{#NODES[@]}} --nodelist="$ALL_NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 --cpu-bind=none{container} \\
  timeout "${{GIGAFACTORY_HEALTH_TIMEOUT:-{timeout}}}" \\
  bash -c '"$0" -m gigafactory.cli.main health --nproc "$1" --size full --node-name "$SLURMD_NODENAME" --storage-dir "$2" --out "$3/$SLURMD_NODENAME.json"' \\
  "$PYTHON" {gpus} "$RUN_DIR" "$HEALTH_DIR" || echo "job $SLURM_JOB_ID: some node failed its health check (see $HEALTH_DIR)"
TRAIN_NODES=$("$PYTHON" -m gigafactory.cli.main health --pick {nodes} --reports "$HEALTH_DIR" --candidates "$ALL_NODES" \\
  --bad-nodes "$RUN_DIR/bad_nodes.json" --out "$HEALTH_DIR/fleet.json")
mapfile -t NODES < <(tr , '\\n' <<< "$TRAIN_NODES")
"""


def slurm_block(spec, container: str) -> str:
    """The pre-flight lines between reading the allocation's nodes and choosing the rendezvous host ("" if off)."""
    if not spec.health:
        return ""
    return SLURM_BLOCK.format(alloc=spec.alloc_nodes, nodes=spec.nodes, spares=spec.spares, run_dir=shlex.quote(spec.train_run_dir),
                              container=container, timeout=HEALTH_TIMEOUT_S, gpus=spec.gpus_per_node)


def slurm_nodelist(spec) -> str:
    return f' --ntasks={spec.nodes} --nodelist="$TRAIN_NODES"' if spec.health else ""


NODE_NAME_ENV = {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}


def rendezvous_name(spec) -> str:
    return f"{spec.name}-rdzv"


def health_init_container(spec, container: dict) -> dict:
    """Runs the health check on the pod's node before training; exit 1 (a bad node) keeps the pod from starting."""
    run_dir = spec.pod_run_dir
    command = ["python", "-m", "gigafactory.cli.main", "health", "--nproc", str(spec.gpus_per_node), "--size", "full",
               "--node-name", "$(NODE_NAME)", "--storage-dir", run_dir, "--out", f"{run_dir}/health/$(NODE_NAME).json"]
    return copy.deepcopy({"name": "health", "image": container["image"], "command": command, "env": [NODE_NAME_ENV],
                          "resources": container["resources"], "volumeMounts": container["volumeMounts"]})  # no YAML aliases


def rendezvous_documents(spec, port: int, pod_labels: dict[str, str]) -> list[dict]:
    """Deployment + Service hosting torchrun's c10d store (no GPU), so no training pod has to be the host."""
    name = rendezvous_name(spec)
    selector = dict(pod_labels, **{"app.kubernetes.io/component": "rendezvous"})
    serve = (f"import time, datetime, torch.distributed as d\n"
             f"store = d.TCPStore('0.0.0.0', {port}, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(hours=1))\n"
             "while True: time.sleep(3600)\n")
    pod = {"containers": [{
        "name": "store", "image": spec.image or "gigafactory:latest", "command": ["python", "-c", serve],
        "ports": [{"name": "rdzv", "containerPort": port}],
        "readinessProbe": {"tcpSocket": {"port": "rdzv"}, "periodSeconds": 2},
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
    }]}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": dict(selector)},
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": dict(selector)},
                 "template": {"metadata": {"labels": dict(selector)}, "spec": pod}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": dict(selector)},
               "spec": {"selector": dict(selector), "ports": [{"name": "rdzv", "port": port, "targetPort": "rdzv"}]}}
    return [deployment, service]


def apply_to_pytorchjob(spec, job: dict, nodes: int) -> None:
    """Health initContainer on every worker, NODE_NAME for the trainer's straggler names, N + K pods with torchrun
    still at N nodes, and the rendezvous moved to the store Service."""
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    pod = worker["template"]["spec"]
    (container,) = pod["containers"]
    container["env"].append(copy.deepcopy(NODE_NAME_ENV))
    pod["initContainers"] = [health_init_container(spec, container)]
    endpoint = f"--rdzv-endpoint={rendezvous_name(spec)}:{job['spec']['elasticPolicy']['rdzvPort']}"
    container["command"] = [endpoint if a.startswith("--rdzv-endpoint=") else a for a in container["command"]]
    container["command"].insert(container["command"].index(endpoint) + 1, "--rdzv-conf=is_host=false")
    worker["replicas"] = nodes + spec.spares
    job["spec"]["elasticPolicy"].update(minReplicas=nodes, maxReplicas=nodes + spec.spares)
    job["spec"]["runPolicy"]["backoffLimit"] = (nodes + spec.spares) * max(1, spec.max_restarts)
