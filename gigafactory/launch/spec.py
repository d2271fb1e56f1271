"""What one multi-node launch needs, validated before any file is written.

Every check fails with a one-line `UserError` (exit code 2 from the CLI): node and GPU counts, the config file,
the extra train flags, and the parallel layout, whose degrees must multiply to nodes x GPUs per node (at most one
-1, inferred by `resolve_dims`, which also checks tp/ep/pp/cp against the model). Under fault tolerance the layout
is one replica group's, and ft.py checks the groups; `--exclude` files are read by exclude.py.

The spec also fixes what both launchers must agree on: the run directory (one per job, so two jobs never resume
from each other's checkpoints) and the stop budget (how long before a time limit or eviction the trainer gets
SIGTERM, so its save of `resilience.term_grace_s` fits).
"""

from __future__ import annotations

import argparse
import math
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory.config.job import JobConfig
from gigafactory.config.loader import add_config_arguments, load_config
from gigafactory.errors import UserError
from gigafactory.launch.exclude import read_exclude
from gigafactory.launch.ft import LIGHTHOUSE_PORT, check_fault_tolerance
from gigafactory.parallel.dims import AXES, ParallelDims, resolve_dims

DEFAULT_PORT = 29400  # torchrun's default c10d rendezvous port

# (name, default, why). Written as `export NAME="${NAME:-default}"` in sbatch, so a site's own value wins.
NCCL_ENV: tuple[tuple[str, str, str], ...] = (
    ("NCCL_DEBUG", "WARN", "INFO (or TRACE) to see topology, transports and rings when diagnosing; WARN keeps logs small."),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", "A failed or timed-out collective aborts the communicator and kills the process, so torchrun restarts the job instead of it hanging."),
    ("TORCH_FR_BUFFER_SIZE", "2000", "Flight recorder: keep the last 2000 collectives per rank (torch < 2.7 reads TORCH_NCCL_TRACE_BUFFER_SIZE) ..."),
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "1", "... and dump them on a timeout, to find the rank that fell behind."),
    ("OMP_NUM_THREADS", "1", "One CPU thread per rank for torch ops (torchrun's own default, set explicitly)."),
    ("PYTHONUNBUFFERED", "1", "Logs appear as they are written."),
    ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1", "Each rendezvous round gets a fresh store for the workers: with the agents' shared store, an agent that restarts because a peer failed keeps its restart count, and its workers then read the dead attempt's addresses (gloo: Connection refused)."),
)
# Site-specific; written commented out. Set them when NCCL picks the wrong network.
NCCL_SITE_ENV: tuple[tuple[str, str, str], ...] = (
    ("NCCL_SOCKET_IFNAME", "eth0", "interface for NCCL's bootstrap and socket transport (e.g. the cluster network)"),
    ("NCCL_IB_HCA", "mlx5", "InfiniBand/RoCE adapters to use (prefix match)"),
)

# After the trainer's own grace: torchrun reaping its workers, process-group teardown, the requeue call.
TEARDOWN_S = 30

_NAME_RE = re.compile(r"[^a-z0-9-]+")
_DNS_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?$")
_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds in a Slurm time limit, None if `text` is not one; 0 = no limit.

    Slurm's formats (sbatch(1) --time, parse_time.c): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; UNLIMITED/INFINITE.
    """
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        return None
    days, a, b, c = m.groups()
    if days is None:
        h, mins, secs = (int(a), int(b), int(c)) if c is not None else (0, int(a), int(b or 0))
    else:
        h, mins, secs = int(a), int(b or 0), int(c or 0)
    return ((int(days or 0) * 24 + h) * 60 + mins) * 60 + secs


@dataclass
class LaunchSpec:
    """One validated launch request."""

    target: str  # "slurm" or "k8s"
    nodes: int
    gpus_per_node: int
    max_restarts: int
    name: str
    config_path: str | None  # absolute path, or None for the default config
    config_text: str | None
    cfg: JobConfig
    dims: ParallelDims
    train_args: list[str] = field(default_factory=list)  # extra `gigafactory train` flags, passed through
    image: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    pvc: str = "gigafactory-runs"
    mount: str = "/runs"
    port: int = DEFAULT_PORT
    run_dir: str | None = None  # --run-dir
    config_run_dir: str | None = None  # the config file's own [logging] run_dir
    queue: str | None = None  # k8s: the gang scheduler's queue (runPolicy.schedulingPolicy.queue, e.g. Volcano)
    scheduler: str | None = None  # k8s: pod schedulerName (e.g. volcano); default: the operator's gang scheduler
    kueue_queue: str | None = None  # k8s: Kueue LocalQueue (label kueue.x-k8s.io/queue-name)
    command_line: str = ""  # the `gigafactory launch ...` that generated the file
    warnings: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)  # hostnames the job must not run on (--exclude FILE)
    lighthouse_port: int = LIGHTHOUSE_PORT  # fault tolerance: the torchft lighthouse's port
    health: bool = False  # run `gigafactory health` on every node before training; failing nodes are dropped
    spares: int = 0  # extra nodes allocated (Slurm) or pods run (k8s) to stand in for nodes that fail health

    @property
    def fault_tolerant(self) -> bool:
        return self.cfg.fault_tolerance.enabled

    @property
    def groups(self) -> int:
        """Replica groups: independent torchrun jobs of nodes_per_group nodes each (1 without fault tolerance)."""
        return self.cfg.fault_tolerance.replica_groups if self.fault_tolerant else 1

    @property
    def nodes_per_group(self) -> int:
        return self.nodes // self.groups

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def layout(self) -> str:
        return " x ".join(f"{axis}={d}" for axis, d in self.dims.degrees.items() if d > 1) or "all 1"

    def has_train_flag(self, key: str) -> bool:
        return any(a == f"--{key}" or a.startswith(f"--{key}=") for a in self.train_args)

    @property
    def grace_s(self) -> int:
        """The trainer's SIGTERM budget: finish the step, save, exit (resilience.term_grace_s, rounded up)."""
        return math.ceil(self.cfg.resilience.term_grace_s)

    @property
    def shutdown_timeout_s(self) -> int:
        """How long torchrun waits for its workers after forwarding SIGTERM before it SIGKILLs them
        (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; torchrun's own default, 30 s, would cut a longer save short)."""
        return self.grace_s + 10

    @property
    def stop_lead_s(self) -> int:
        """Warning before a hard stop: Slurm's --signal lead and the pod's terminationGracePeriodSeconds."""
        return self.grace_s + TEARDOWN_S

    @property
    def alloc_nodes(self) -> int:
        """Nodes asked of the scheduler: the job's plus its spares."""
        return self.nodes + self.spares

    @property
    def train_run_dir(self) -> str:
        """The run directory the Slurm job's trainer uses (relative to the submission directory unless absolute)."""
        for i, arg in enumerate(self.train_args):
            if arg.startswith("--logging.run_dir="):
                return arg.split("=", 1)[1]
            if arg == "--logging.run_dir" and i + 1 < len(self.train_args):
                return self.train_args[i + 1]
        return self.run_dir or self.config_run_dir or self.default_run_dir

    @property
    def default_run_dir(self) -> str:
        """Where the job writes when nothing sets logging.run_dir: named after the job, never a shared default."""
        return f"runs/{self.name}"

    @property
    def pod_run_dir(self) -> str:
        """k8s: the run directory on the shared volume: --run-dir or the config's run_dir (a relative one goes under
        the mount, less a leading `runs/`, since the mount is the runs directory), else <mount>/<job name>."""
        chosen = self.run_dir if self.run_dir is not None else self.config_run_dir
        if chosen is None:
            return f"{self.mount}/{self.name}"
        if posixpath.isabs(chosen):
            return posixpath.normpath(chosen)
        rel = posixpath.normpath(chosen)
        rel = rel[len("runs/"):] if rel.startswith("runs/") else rel
        return f"{self.mount}/{rel}" if rel not in (".", "runs") else f"{self.mount}/{self.name}"


def shutdown_env(spec: LaunchSpec) -> tuple[str, str, str]:
    """(name, value, why) of the torchrun setting that lets a SIGTERM save finish. Read by torchrun versions that
    have --shutdown-timeout (torch 2.13 has it); an older torchrun ignores it and SIGKILLs its workers after 30 s."""
    return ("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(spec.shutdown_timeout_s),
            f"After forwarding SIGTERM, torchrun waits this long for the ranks' save (resilience.term_grace_s = {spec.grace_s} s) before SIGKILL; its default is 30 s.")


def job_name(text: str) -> str:
    """A DNS-1123 label short enough for `<name>-worker-<index>` service names (Kubernetes) and Slurm."""
    name = _NAME_RE.sub("-", text.lower()).strip("-")[:40].strip("-")
    return name if name and name[0].isalpha() else f"gf-{name}".strip("-")


def _config_run_dir(config_text: str | None) -> str | None:
    """The config file's own [logging] run_dir, if it sets one (the defaults' run_dir is shared by every job)."""
    if config_text is None:
        return None
    value = tomllib.loads(config_text).get("logging", {}).get("run_dir")  # already parsed once by load_config
    return value if isinstance(value, str) else None


def _train_flags_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gigafactory train", allow_abbrev=False, add_help=False)
    add_config_arguments(parser)
    return parser


def _check_train_args(train_args: list[str]) -> argparse.Namespace:
    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag == "--nproc":
            raise UserError("--nproc after `--` conflicts with the launcher: the process count is --nodes x --gpus-per-node")
        if flag == "--config":
            raise UserError("pass the config file as `gigafactory launch ... --config FILE`, before the `--`")
        if flag in ("--print-config", "-h", "--help"):
            raise UserError(f"{flag} after `--` would stop every rank before training; remove it")
    namespace, unknown = _train_flags_parser().parse_known_args(train_args)
    if unknown:
        raise UserError(f"unknown train flag(s) after `--`: {' '.join(unknown)}; use --section.key VALUE (see `gigafactory train --help`)")
    return namespace


def _check_layout(cfg: JobConfig, nodes: int, gpus_per_node: int, groups: int = 1) -> ParallelDims:
    """The layout of one torchrun job: the whole job, or one of `groups` replica groups under fault tolerance."""
    world = nodes * gpus_per_node
    where = f"{nodes} node(s) x {gpus_per_node} GPU(s) = {world} processes"
    if groups > 1:
        where += f" per replica group ({groups} groups)"
    p = cfg.parallel
    degrees = {axis: getattr(p, axis) for axis in AXES}
    inferred = [axis for axis, d in degrees.items() if d == -1]
    known = math.prod(d for d in degrees.values() if d != -1)
    given = " x ".join(f"{axis}={d}" for axis, d in degrees.items() if d != 1) or "all 1"
    if not inferred and known != world:
        hint = "set one degree to -1 or change --nodes/--gpus-per-node"
        if p.ep > 1 and known // p.ep == world and p.dp_shard % p.ep == 0:
            # `gigafactory plan` counts ep inside dp_shard; the trainer's mesh has ep as its own axis.
            hint = f"ep is its own mesh axis here, not carved out of dp_shard as in `gigafactory plan`: set parallel.dp_shard = {p.dp_shard // p.ep}"
        raise UserError(f"parallel layout {given} needs {known} processes but {where}; {hint}")
    if len(inferred) == 1 and world % known:
        raise UserError(f"parallel layout {given} (product {known} without parallel.{inferred[0]}=-1) does not divide {where}; change the degrees or the node count")
    try:
        return resolve_dims(cfg, world)
    except UserError as err:
        raise UserError(f"{err} (for {where})") from None


_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_NODES = 100_000  # a bound far above any real job, so a typo'd --nodes 10**30 is an error, not a file of that many pods


def refuse_control_characters(**values) -> None:
    """Every value the launchers write into a file must be one line: a newline in `--partition` would add its own
    `#SBATCH` directive, and one in `--image` (or a train flag) its own script or YAML line. Refused, not escaped."""
    for key, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _CONTROL_RE.search(item):
                flag = "arguments after `--`" if key == "train_args" else "the command line" if key == "command_line" else f"--{key.replace('_', '-')}"
                raise UserError(f"{flag} {item!r} contains a newline or other control character; give a single-line value")


def build_spec(
    target: str,
    *,
    nodes: int,
    gpus_per_node: int,
    config: str | None = None,
    train_args: list[str] | None = None,
    max_restarts: int | None = None,
    name: str | None = None,
    image: str | None = None,
    time: str = "24:00:00",
    partition: str | None = None,
    account: str | None = None,
    pvc: str = "gigafactory-runs",
    port: int = DEFAULT_PORT,
    run_dir: str | None = None,
    queue: str | None = None,
    scheduler: str | None = None,
    kueue_queue: str | None = None,
    command_line: str = "",
    exclude: str | None = None,
    lighthouse_port: int = LIGHTHOUSE_PORT,
    health: bool = False,
    spares: int = 0,
) -> LaunchSpec:
    """Validate a launch request; raise UserError (one line) on any bad input."""
    refuse_control_characters(image=image, time=time, partition=partition, account=account, run_dir=run_dir,
                               config=config, name=name, train_args=train_args, command_line=command_line, exclude=exclude)
    if target not in ("slurm", "k8s"):
        raise UserError(f"launch target {target!r} must be slurm or k8s")
    if nodes < 1 or gpus_per_node < 1:
        raise UserError(f"--nodes {nodes} must be >= 1" if nodes < 1 else f"--gpus-per-node {gpus_per_node} must be >= 1")
    if nodes > MAX_NODES or gpus_per_node > 64:
        raise UserError(f"--nodes {nodes} must be at most {MAX_NODES:,} and --gpus-per-node {gpus_per_node} at most 64")
    if max_restarts is not None and max_restarts < 0:
        raise UserError(f"--max-restarts {max_restarts} must be >= 0")
    if spares < 0:
        raise UserError(f"--spares {spares} must be >= 0")
    if nodes + spares > MAX_NODES:
        raise UserError(f"--nodes {nodes} + --spares {spares} is over {MAX_NODES:,} nodes")
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} must be a TCP port (1-65535)")
    time_s = slurm_time_seconds(time)
    if time_s is None:
        raise UserError(f"--time {time!r} is not a Slurm time limit; use e.g. 24:00:00, 90 (minutes) or 2-00:00:00")
    if not _DNS_RE.match(pvc):
        raise UserError(f"--pvc {pvc!r} must be a Kubernetes name (lowercase letters, digits and '-')")
    for flag, value in (("--queue", queue), ("--scheduler", scheduler), ("--kueue-queue", kueue_queue)):
        if value is not None and not _SUBDOMAIN_RE.match(value):
            raise UserError(f"{flag} {value!r} must be a Kubernetes name (lowercase letters, digits, '-' and '.')")
    if run_dir is not None and not run_dir.strip():
        raise UserError("--run-dir must name a directory")
    train_args = list(train_args or [])
    overrides = _check_train_args(train_args)
    if run_dir is not None and any(a.split("=", 1)[0] == "--logging.run_dir" for a in train_args):
        raise UserError("--run-dir and --logging.run_dir after `--` both set the run directory; keep one")

    config_path = config_text = None
    if config is not None:
        path = Path(config).expanduser()
        if not path.is_file():
            raise UserError(f"--config {config!r}: file not found; pass an existing TOML file")
        config_path = str(path.resolve())
        config_text = path.read_text()
    cfg = load_config(overrides, config_path=config_path)  # ConfigError (a UserError) names the bad key

    group_nodes, groups = nodes, 1
    if cfg.fault_tolerance.enabled:
        groups = cfg.fault_tolerance.replica_groups
        group_nodes = check_fault_tolerance(cfg.fault_tolerance, nodes=nodes, port=port, lighthouse_port=lighthouse_port, train_args=train_args)
    dims = _check_layout(cfg, group_nodes, gpus_per_node, groups)
    excluded = read_exclude(exclude, refuse_control_characters) if exclude is not None else []
    restarts = cfg.resilience.max_restarts if max_restarts is None else max_restarts
    spec = LaunchSpec(
        target=target, nodes=nodes, gpus_per_node=gpus_per_node, max_restarts=restarts,
        # a job without a config is named after its model, so its run directory is too
        name=job_name(name or (Path(config).stem if config else cfg.model.name)),
        config_path=config_path, config_text=config_text, cfg=cfg, dims=dims, train_args=train_args,
        image=image, time=time, partition=partition, account=account, pvc=pvc, port=port,
        run_dir=run_dir, config_run_dir=_config_run_dir(config_text),
        queue=queue, scheduler=scheduler, kueue_queue=kueue_queue, command_line=command_line,
        exclude=excluded, lighthouse_port=lighthouse_port, health=health or spares > 0, spares=spares,
    )
    if spec.health and cfg.fault_tolerance.enabled:
        raise UserError("--health/--spares are not available with fault_tolerance.enabled yet (each replica group would need "
                        "its own spares); run `gigafactory health` first and pass its report with --exclude")
    if exclude is not None and not excluded:
        spec.warnings.append(f"--exclude {exclude!r} lists no nodes: nothing is excluded")
    if cfg.fault_tolerance.enabled and groups == 1:
        spec.warnings.append("fault_tolerance.replica_groups=1: with one replica group there is no peer to keep training or to heal from")
    if target == "k8s" and groups > 1 and len(f"{spec.name}-g{groups - 1}-worker-{group_nodes - 1}") > 63:
        raise UserError(f"job name {spec.name!r} is too long for {groups} replica groups' pod names (at most 63 characters); pass a shorter --name")
    if name is not None and spec.name != name:
        raise UserError(f"--name {name!r} must be a DNS label (lowercase letters, digits and '-', <= 40 characters), e.g. {spec.name!r}")
    if target == "slurm" and spec.stop_lead_s > 0xFFFF:  # sbatch --signal's sig_time limit
        raise UserError(f"resilience.term_grace_s={spec.cfg.resilience.term_grace_s:g} is too long for Slurm's --signal (at most {0xFFFF - TEARDOWN_S} s)")
    if target == "slurm" and 0 < time_s <= spec.stop_lead_s:
        raise UserError(f"--time {time} leaves no training time: the job is told to stop {spec.stop_lead_s} s before its limit "
                        f"(resilience.term_grace_s={spec.cfg.resilience.term_grace_s:g} + {TEARDOWN_S} s); ask for more time")
    if target == "k8s" and not spec.has_train_flag("logging.run_dir") and not (spec.pod_run_dir + "/").startswith(spec.mount + "/"):
        spec.warnings.append(f"run directory {spec.pod_run_dir} is not on the shared volume ({spec.mount}): checkpoints would be lost with the pod")
    if dims.tp > gpus_per_node or gpus_per_node % dims.tp:
        spec.warnings.append(f"parallel.tp={dims.tp} does not fit in one node of {gpus_per_node} GPUs: tensor-parallel traffic will cross the network")
    return spec
