"""The Kubernetes manifest of a fault-tolerant job: a lighthouse Deployment + Service and one PyTorchJob per group.

Why this shape (docs/scale-out.md, "Fault-tolerant replica groups"):
- One PyTorchJob per replica group (`<job>-g<g>`), each with its own gang (minAvailable = its nodes), rendezvous
  (`<job>-g<g>-worker-0`, port + g), restart budget and backoffLimit: a failed pod restarts its own group only,
  and the restarted group heals from a live peer while the others keep stepping. A group that cannot be placed
  does not hold back the others.
- The lighthouse is a Deployment of one pod (the kubelet or the ReplicaSet restarts it; the groups' managers ride
  out the restart) with `strategy: Recreate`, so a rollout never runs two lighthouses that would each form a
  quorum of their own. Its Service gives it a stable name, `<job>-lighthouse`, that every group is pointed at.
- `--exclude` nodes are kept off every pod, the lighthouse's included.
"""

from __future__ import annotations

from gigafactory.launch.ft import group_flags, lighthouse_command
from gigafactory.launch.k8s import config_map, header, labels, node_affinity, pytorchjob, to_yaml
from gigafactory.launch.spec import LaunchSpec

GROUP_LABEL = "gigafactory/replica-group"
COMPONENT_LABEL = "app.kubernetes.io/component"


def lighthouse_name(spec: LaunchSpec) -> str:
    return f"{spec.name}-lighthouse"


def lighthouse_documents(spec: LaunchSpec) -> list[dict]:
    """Deployment + Service of the torchft lighthouse (no GPU; small requests so it fits on any node)."""
    name, port = lighthouse_name(spec), spec.lighthouse_port
    selector = dict(labels(spec), **{COMPONENT_LABEL: "lighthouse"})
    pod = {
        "containers": [{
            "name": "lighthouse",
            "image": spec.image or "gigafactory:latest",  # the torchft wheel installs torchft_lighthouse
            "command": lighthouse_command(spec.cfg.fault_tolerance, port),
            "ports": [{"name": "lighthouse", "containerPort": port}],
            "readinessProbe": {"tcpSocket": {"port": "lighthouse"}, "periodSeconds": 2},
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
        }],
    }
    if spec.exclude:
        pod["affinity"] = node_affinity(spec.exclude)
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": dict(selector)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # never two lighthouses at once
            "selector": {"matchLabels": dict(selector)},
            "template": {"metadata": {"labels": dict(selector)}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": dict(selector)},
        "spec": {"selector": dict(selector), "ports": [{"name": "lighthouse", "port": port, "targetPort": "lighthouse"}]},
    }
    return [deployment, service]


def render_ft(spec: LaunchSpec) -> str:
    ft = spec.cfg.fault_tolerance
    documents = [doc for doc in [config_map(spec)] if doc]
    if ft.lighthouse:  # the site's own lighthouse
        address, where = ft.lighthouse, ft.lighthouse
    else:
        documents += lighthouse_documents(spec)
        address = f"http://{lighthouse_name(spec)}:{spec.lighthouse_port}"
        where = f"Deployment + Service {lighthouse_name(spec)!r}, port {spec.lighthouse_port}"
    for g in range(spec.groups):
        documents.append(pytorchjob(spec, name=f"{spec.name}-g{g}", nodes=spec.nodes_per_group, port=spec.port + g,
                                    extra_argv=tuple(group_flags(g, address)), extra_labels={GROUP_LABEL: str(g)}))
    extra = (f"# Fault tolerance (torchft): {spec.groups} replica groups of {spec.nodes_per_group} node(s), one PyTorchJob each "
             f"({spec.name}-g0 ..); the layout is per group. Lighthouse: {where}.\n"
             f"# Delete everything with: kubectl delete -f FILE (the lighthouse outlives the groups).\n")
    return header(spec, extra) + to_yaml(*documents)
