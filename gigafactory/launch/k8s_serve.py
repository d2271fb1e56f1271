"""Kubernetes manifests for serving: model replicas per region behind `gigafactory gateway` (`launch k8s --serve`).

Why this shape (docs/gateway.md, "Kubernetes"):
- One Deployment (replicas: 1) + ClusterIP Service per model replica, `<name>-<region>-<i>`: the gateway routes to
  each replica itself (least outstanding requests, affinity, prefix cache), so every replica needs its own stable
  name; a single Service over all pods would hide them behind kube-proxy's random choice.
- Readiness on /ready (engine running, model loaded, queue below its bound): a loading or saturated replica gets no
  traffic from the Service, and the gateway's own check uses the same route. Liveness on /health, after a startup
  probe that gives a big checkpoint minutes to load. terminationGracePeriodSeconds covers serve's 30 s drain.
- The gateway: a ConfigMap with its TOML (every replica's URL, a region table each; phases are added by editing it
  and `kubectl rollout restart`, or by SIGHUP), a Deployment of `gateway_pods` pods (default 1; keys, rate limits,
  quotas and the canary live in each pod's memory, and with N pods the config's `pods = N` has each enforce 1/N of
  every limit; phase state and decision log on the shared volume), a Service in front.
- The admin key comes from a Secret (`<name>-gateway-admin`, key `admin-key`) when it exists; without it the admin
  routes are off.
Written with PyYAML's safe dumper through launch.k8s.to_yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gigafactory.errors import UserError
from gigafactory.launch.k8s import Literal, to_yaml
from gigafactory.launch.spec import refuse_control_characters

CONFIG_DIR = "/etc/gigafactory"
GATEWAY_TOML = "gateway.toml"
NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # a Service name (RFC 1035 label): starts with a letter
POOL_RE = re.compile(r"[A-Za-z0-9][-A-Za-z0-9_.]{0,62}")  # also serve's --checkpoint NAME=PATH name: no '='
MAX_REPLICAS = 1000  # per region; beyond it is a typo (each replica is its own Deployment and Service)
MAX_GATEWAY_PODS = 64


@dataclass(frozen=True)
class ServeFleetSpec:
    regions: dict[str, int]  # region -> model replicas
    checkpoint: str  # run directory or checkpoint, as seen inside the pods (on the volume)
    name: str = "grok"
    pool: str = "grok"  # the pool (model version) these replicas serve
    image: str = "gigafactory:latest"
    pvc: str = "gigafactory-runs"
    mount: str = "/runs"
    gpus: int = 1  # per replica; 0 = CPU
    port: int = 8000
    gateway_port: int = 8080
    gateway_service_type: str = "ClusterIP"  # LoadBalancer to expose it
    gateway_pods: int = 1  # gateway processes behind its Service; each enforces 1/gateway_pods of every limit
    serve_args: tuple[str, ...] = ()  # extra `gigafactory serve` flags (--slots, --max-queue ...)
    region_label: str = ""  # node label whose value is the region (pods of a region stay on its nodes); "" = anywhere
    countries: dict[str, list[str]] = field(default_factory=dict)  # region -> country codes for the gateway


def parse_regions(text: str) -> dict[str, int]:
    """`EU=3,US=2` -> {"EU": 3, "US": 2}; a bad item is a one-line error."""
    regions: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, count = item.partition("=")
        name = name.strip().upper()
        if not sep or not re.fullmatch(r"[0-9]{1,4}", count.strip()) or not 1 <= int(count) <= MAX_REPLICAS \
                or not re.fullmatch(r"[A-Z0-9]{1,20}", name):
            raise UserError(f"--regions: {item[:40]!r} must be REGION=REPLICAS, e.g. EU=3 (letters/digits, replicas "
                            f"1..{MAX_REPLICAS})")
        if name in regions:
            raise UserError(f"--regions: region {name} is given twice")
        regions[name] = int(count)
    if not regions:
        raise UserError("--regions: give at least one REGION=REPLICAS, e.g. EU=3,US=2")
    return regions


def check(spec: ServeFleetSpec) -> None:
    if not NAME_RE.fullmatch(spec.name) or len(spec.name) > 40:
        raise UserError(f"--name {spec.name[:60]!r}: a lowercase letter, then letters, digits and '-', at most 40 "
                        "characters (a Kubernetes name, for Services)")
    longest = max((replica_name(spec, region, count - 1) for region, count in spec.regions.items()), key=len)
    if len(longest) > 63:
        raise UserError(f"replica Service {longest!r} is over Kubernetes' 63 characters; shorten --name or the region names")
    refuse_control_characters(checkpoint=spec.checkpoint, image=spec.image, pvc=spec.pvc,
                              train_args=list(spec.serve_args))  # a newline would start its own YAML line
    if not POOL_RE.fullmatch(spec.pool):
        raise UserError(f"--pool {spec.pool[:40]!r}: letters, digits, '-', '_' and '.', at most 63 characters")
    if not spec.checkpoint.startswith("/"):
        raise UserError(f"--checkpoint {spec.checkpoint!r}: give the path inside the pods, e.g. {spec.mount}/grok/checkpoints")
    if not 0 <= spec.gpus <= 64:
        raise UserError(f"--gpus-per-replica {spec.gpus} must be in 0..64")
    if not 1 <= spec.gateway_pods <= MAX_GATEWAY_PODS:
        raise UserError(f"gateway pods {spec.gateway_pods} must be in 1..{MAX_GATEWAY_PODS}")
    if spec.gateway_service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        raise UserError(f"gateway service type {spec.gateway_service_type!r}: ClusterIP, NodePort or LoadBalancer")


def replica_name(spec: ServeFleetSpec, region: str, i: int) -> str:
    return f"{spec.name}-{region.lower()}-{i}"


def _labels(spec: ServeFleetSpec, component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gigafactory", "app.kubernetes.io/component": component,
            "gigafactory/fleet": spec.name, **extra}


def _volume(spec: ServeFleetSpec, read_only: bool) -> tuple[dict, dict]:
    return ({"name": "runs", "persistentVolumeClaim": {"claimName": spec.pvc, "readOnly": read_only}},
            {"name": "runs", "mountPath": spec.mount, "readOnly": read_only})


def _deployment(name: str, labels: dict, pod: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": dict(labels)},
            "spec": {"replicas": 1, "selector": {"matchLabels": dict(labels)},
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}


def _service(name: str, labels: dict, port: int, kind: str = "ClusterIP") -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": dict(labels)},
            "spec": {"type": kind, "selector": dict(labels), "ports": [{"name": "http", "port": port, "targetPort": "http"}]}}


def _probes(port_name: str = "http") -> dict:
    return {
        "startupProbe": {"httpGet": {"path": "/health", "port": port_name}, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": port_name}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": port_name}, "periodSeconds": 10, "failureThreshold": 6},
    }


def replica_documents(spec: ServeFleetSpec, region: str, i: int) -> list[dict]:
    name = replica_name(spec, region, i)
    labels = _labels(spec, "serve", **{"gigafactory/region": region, "gigafactory/replica": name})
    volume, mount = _volume(spec, read_only=True)
    resources = {"limits": {"nvidia.com/gpu": spec.gpus}} if spec.gpus else {"requests": {"cpu": "2", "memory": "4Gi"}}
    container = {
        "name": "serve", "image": spec.image,
        "command": ["gigafactory", "serve", "--checkpoint", f"{spec.pool}={spec.checkpoint}", "--host", "0.0.0.0",
                    "--port", str(spec.port), "--device", "cuda" if spec.gpus else "cpu", "--trusted-proxies", "",
                    *spec.serve_args],
        "ports": [{"name": "http", "containerPort": spec.port}],
        **_probes(), "resources": resources, "volumeMounts": [mount],
    }
    pod = {"containers": [container], "volumes": [volume], "terminationGracePeriodSeconds": 40}
    if spec.region_label:
        pod["nodeSelector"] = {spec.region_label: region}
    return [_deployment(name, labels, pod), _service(name, labels, spec.port)]


def _toml(value) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def gateway_toml(spec: ServeFleetSpec) -> str:
    """The gateway's config: every replica by its Service name; each region falls back to the pool (add
    [[regions.X.phases]] to roll a new pool out)."""
    state_dir = f"{spec.mount}/{spec.name}-gateway"
    lines = [f"# gigafactory gateway config for fleet {spec.name!r} (docs/gateway.md)",
             'admin_key_env = "GIGAFACTORY_ADMIN_KEY"', f"decisions_log = {_toml(state_dir + '/decisions.jsonl')}",
             f"state_file = {_toml(state_dir + '/state.json')}", "trusted_proxies = []",
             f"pods = {spec.gateway_pods}  # gateway pods (the Deployment's replicas); each enforces 1/pods of every limit",
             f"default_region = {_toml(next(iter(spec.regions)))}", ""]
    for region, count in spec.regions.items():
        for i in range(count):
            name = replica_name(spec, region, i)
            lines += ["[[replicas]]", f"name = {_toml(name)}", f"url = {_toml(f'http://{name}:{spec.port}')}",
                      f"region = {_toml(region)}", f"pool = {_toml(spec.pool)}", ""]
    for region in spec.regions:
        lines += [f"[regions.{region}]", f"countries = {_toml(spec.countries.get(region, []))}",
                  f"fallback = {_toml(spec.pool)}", ""]
    return "\n".join(lines)


def gateway_documents(spec: ServeFleetSpec) -> list[dict]:
    name = f"{spec.name}-gateway"
    labels = _labels(spec, "gateway")
    volume, mount = _volume(spec, read_only=False)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": dict(labels)},
                  "data": {GATEWAY_TOML: Literal(gateway_toml(spec))}}
    container = {
        "name": "gateway", "image": spec.image,
        "command": ["sh", "-c", f"mkdir -p {spec.mount}/{spec.name}-gateway && exec gigafactory gateway "
                                f"--config {CONFIG_DIR}/{GATEWAY_TOML} --host 0.0.0.0 --port {spec.gateway_port}"],
        "ports": [{"name": "http", "containerPort": spec.gateway_port}],
        "env": [{"name": "GIGAFACTORY_ADMIN_KEY", "valueFrom": {"secretKeyRef": {
            "name": f"{name}-admin", "key": "admin-key", "optional": True}}}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "2", "memory": "1Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, mount],
    }
    pod = {"containers": [container], "terminationGracePeriodSeconds": 40,
           "volumes": [{"name": "config", "configMap": {"name": name}}, volume]}
    deployment = _deployment(name, labels, pod)
    deployment["spec"]["replicas"] = spec.gateway_pods
    if spec.gateway_pods == 1:  # one gateway at a time: the canary state is its own
        deployment["spec"]["strategy"] = {"type": "Recreate"}
    else:  # never more pods than `pods`, each of which enforces 1/pods of the limits
        deployment["spec"]["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return [config_map, deployment, _service(name, labels, spec.gateway_port, spec.gateway_service_type)]


def render_serve(spec: ServeFleetSpec, command_line: str = "") -> str:
    """The whole manifest: every region's replicas, then the gateway. Apply with kubectl apply -f FILE."""
    check(spec)
    documents = [doc for region, count in spec.regions.items() for i in range(count)
                 for doc in replica_documents(spec, region, i)]
    documents += gateway_documents(spec)
    total = sum(spec.regions.values())
    head = (f"# Generated by: {command_line or 'gigafactory launch k8s --serve'}\n"
            f"# {total} serve replica(s) ({', '.join(f'{r}: {n}' for r, n in spec.regions.items())}) of {spec.checkpoint} "
            f"as pool {spec.pool!r}, {spec.gpus} GPU(s) each, behind Service {spec.name}-gateway:{spec.gateway_port} "
            f"({spec.gateway_pods} gateway pod(s)).\n"
            f"# Needs a PVC named {spec.pvc!r} holding the checkpoint (mounted at {spec.mount}). Admin key (optional): kubectl\n"
            f"# create secret generic {spec.name}-gateway-admin --from-literal=admin-key=... . See docs/gateway.md.\n")
    return head + to_yaml(*documents)
