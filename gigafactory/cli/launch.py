"""`gigafactory launch slurm|k8s`: write an sbatch script or a Kubernetes PyTorchJob for a multi-node training job."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gigafactory.errors import UserError


class _SplitAtDoubleDash:
    """Everything after the first `--` is kept verbatim as extra `gigafactory train` flags (args.train_args)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        extra: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, extra = args[:cut], args[cut + 1 :]
        namespace, rest = super().parse_known_args(args, namespace)
        namespace.train_args = extra
        return namespace, rest


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        allow_abbrev=False,
        help="Write a Slurm sbatch script or a Kubernetes PyTorchJob that runs `gigafactory train` on many nodes.",
        description=(
            "Write the file that starts one training job on N nodes x G GPUs: torchrun on every node with c10d "
            "rendezvous, restarts by torchrun's elastic agent. The config's parallel degrees must multiply to "
            "N x G (one may be -1). Flags after `--` are passed to `gigafactory train`. See docs/scale-out.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.__class__ = type("LaunchParser", (_SplitAtDoubleDash, type(parser)), {})
    parser.add_argument("target", choices=("slurm", "k8s"), help="slurm = sbatch script; k8s = ConfigMap + Kubeflow PyTorchJob YAML.")
    parser.add_argument("--nodes", type=int, help="Nodes (one torchrun agent each); required unless --serve.")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (one training process each); required unless --serve.")
    parser.add_argument("--config", metavar="FILE", help="Training config TOML (its [parallel] layout is checked against nodes x GPUs).")
    parser.add_argument("--out", metavar="FILE", help="Write here instead of to stdout.")
    parser.add_argument("--max-restarts", type=int, default=None, help="torchrun restart budget; default: the config's resilience.max_restarts.")
    parser.add_argument("--name", help="Job name (DNS label); default: the config file's name.")
    parser.add_argument("--image", help="Container image (k8s: default gigafactory:latest; slurm: run under pyxis/enroot).")
    parser.add_argument("--port", type=int, default=29400, help="c10d rendezvous port on the first node.")
    parser.add_argument("--time", default="24:00:00", help="slurm: wall-clock limit (#SBATCH --time).")
    parser.add_argument("--partition", help="slurm: partition (#SBATCH --partition).")
    parser.add_argument("--account", help="slurm: account (#SBATCH --account).")
    parser.add_argument("--run-dir", metavar="DIR", help="The job's logging.run_dir (k8s: relative = under the volume); default: the config's, else runs/<name>.")
    parser.add_argument("--pvc", default="gigafactory-runs", help="k8s: ReadWriteMany PersistentVolumeClaim for run dir, checkpoints and data cache.")
    parser.add_argument("--queue", help="k8s: gang-scheduler queue (runPolicy.schedulingPolicy.queue, e.g. a Volcano queue).")
    parser.add_argument("--scheduler", help="k8s: pod schedulerName (e.g. volcano); default: set by the operator's gang scheduler.")
    parser.add_argument("--kueue-queue", metavar="QUEUE", help="k8s: Kueue LocalQueue (label kueue.x-k8s.io/queue-name); Kueue admits all pods at once.")
    parser.add_argument("--exclude", metavar="FILE", help='Keep the job off these nodes: a JSON list of hostnames or {"bad_nodes": [...]} (slurm: #SBATCH --exclude; k8s: node anti-affinity).')
    parser.add_argument("--health", action="store_true", help="Run `gigafactory health` on every node before training (and at every requeue); a node that fails is dropped (docs/operations.md).")
    parser.add_argument("--spares", type=int, default=0, help="Spare nodes (implies --health): slurm allocates nodes + spares and trains on the first healthy ones; k8s runs nodes + spares pods, the spares waiting in torchrun's rendezvous to replace a failed node.")
    parser.add_argument("--lighthouse-port", type=int, default=29510, help="With fault_tolerance.enabled: the torchft lighthouse's port (replica group g rendezvous on --port + g).")
    serve = parser.add_argument_group("serving fleet (k8s --serve; flags after `--` go to `gigafactory serve`; docs/gateway.md)")
    serve.add_argument("--serve", action="store_true", help="k8s: write serve replicas per region (readiness on /ready) and the gateway in front, instead of a training job.")
    serve.add_argument("--regions", default="EU=2", help="With --serve: REGION=REPLICAS,... e.g. EU=3,US=2.")
    serve.add_argument("--checkpoint", metavar="PATH", help="With --serve: the run directory or checkpoint to serve, as seen inside the pods (on --pvc).")
    serve.add_argument("--pool", default="grok", help="With --serve: the pool (model version) these replicas serve in the gateway's rollout.")
    serve.add_argument("--gpus-per-replica", type=int, default=1, help="With --serve: GPUs per serve replica (0 = CPU).")
    serve.add_argument("--gateway-pods", type=int, default=1, help="With --serve: gateway pods; each enforces 1/N of every rate limit and quota.")
    parser.set_defaults(func=run, train_args=[])


def run(args: argparse.Namespace) -> int:
    from gigafactory.launch import build_spec, render_pytorchjob, render_sbatch

    if args.serve:
        return _run_serve(args)
    missing = [flag for flag in ("nodes", "gpus_per_node") if getattr(args, flag) is None]
    if missing:
        raise UserError(f"launch {args.target}: give --{missing[0].replace('_', '-')} (or --serve for a serving fleet)")

    argv = ["gigafactory", "launch", args.target, "--nodes", str(args.nodes), "--gpus-per-node", str(args.gpus_per_node)]
    for flag in ("config", "out", "max_restarts", "name", "image", "partition", "account", "run_dir", "queue", "scheduler", "kueue_queue", "exclude"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for flag, default in (("time", "24:00:00"), ("port", 29400), ("pvc", "gigafactory-runs"), ("lighthouse_port", 29510)):
        if getattr(args, flag) != default:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.health:
        argv.append("--health")
    if args.spares:
        argv += ["--spares", str(args.spares)]
    if args.train_args:
        argv += ["--", *args.train_args]
    spec = build_spec(
        args.target, nodes=args.nodes, gpus_per_node=args.gpus_per_node, config=args.config, train_args=args.train_args,
        max_restarts=args.max_restarts, name=args.name, image=args.image, time=args.time, partition=args.partition,
        account=args.account, pvc=args.pvc, port=args.port, run_dir=args.run_dir, queue=args.queue,
        scheduler=args.scheduler, kueue_queue=args.kueue_queue, command_line=shlex.join(argv), exclude=args.exclude,
        lighthouse_port=args.lighthouse_port, health=args.health, spares=args.spares,
    )
    for warning in spec.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.target == "slurm":
        text = render_sbatch(spec, script_name=args.out or "job.sbatch")
        submit = "sbatch"
    else:
        text = render_pytorchjob(spec)
        submit = "kubectl apply -f"
    groups = f" in {spec.groups} replica groups" if spec.fault_tolerant else ""
    _write(args.out, text, f"{spec.nodes} node(s) x {spec.gpus_per_node} GPU(s){groups}, layout {spec.layout}", submit,
           executable=args.target == "slurm")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from gigafactory.launch.k8s_serve import ServeFleetSpec, parse_regions, render_serve

    if args.target != "k8s":
        raise UserError("--serve writes Kubernetes manifests: use `gigafactory launch k8s --serve`")
    training_only = [flag for flag, given in (("--nodes", args.nodes is not None), ("--gpus-per-node", args.gpus_per_node is not None),
                                              ("--config", args.config), ("--health", args.health), ("--spares", args.spares))
                     if given]
    if training_only:
        raise UserError(f"{training_only[0]} is for a training job; a --serve fleet is sized by --regions and --gpus-per-replica")
    if not args.checkpoint:
        raise UserError("launch k8s --serve: give --checkpoint, the path of the run or checkpoint inside the pods (e.g. /runs/grok-tiny)")
    spec = ServeFleetSpec(
        regions=parse_regions(args.regions), checkpoint=args.checkpoint, name=args.name or "grok", pool=args.pool,
        image=args.image or "gigafactory:latest", pvc=args.pvc, gpus=args.gpus_per_replica, serve_args=tuple(args.train_args),
        gateway_pods=args.gateway_pods,
    )
    argv = ["gigafactory", "launch", "k8s", "--serve", "--regions", args.regions, "--checkpoint", args.checkpoint]
    argv += ["--gateway-pods", str(args.gateway_pods)] if args.gateway_pods != 1 else []
    text = render_serve(spec, shlex.join(argv + (["--", *args.train_args] if args.train_args else [])))
    _write(args.out, text, f"{sum(spec.regions.values())} serve replica(s) + gateway", "kubectl apply -f")
    return 0


def _write(out_arg: str | None, text: str, what: str, submit: str, executable: bool = False) -> None:
    """The file to stdout, or to --out (folders created) with a one-line summary on stderr."""
    if not out_arg:
        sys.stdout.write(text)
        return
    out = Path(out_arg)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if executable:
            out.chmod(out.stat().st_mode | 0o111)
    except OSError as err:
        raise UserError(f"--out {out_arg!r}: cannot write ({err.strerror or err})") from None
    print(f"wrote {out} ({what}); submit with: {submit} {shlex.quote(str(out))}", file=sys.stderr)
