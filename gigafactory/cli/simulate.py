"""`gigafactory simulate`: failures, restarts and goodput of one large training job (see docs/simulate.md).

Every knob of gigafactory.simulate.config is a flag named after it (`--gpus`, `--checkpoint-s`, `--spare-nodes`, ...).
Precedence: explicit flags > `--from-plan FILE.json` > defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing

from gigafactory.cli.paths import png_file
from gigafactory.errors import UserError
from gigafactory.simulate.config import ClusterSpec, JobSpec, SimConfig, SimSpec
from gigafactory.simulate.power import PowerSpec
from gigafactory.simulate.recovery import RecoverySpec

SPECS = (("cluster", ClusterSpec), ("job", JobSpec), ("sim", SimSpec), ("recovery", RecoverySpec))
RENAMED = {"checkpoint_interval_s": "checkpoint-interval"}
# Defaults that depend on another flag: replica groups keep today's async disk saves (issue 20's design); a job
# restarted as a whole is priced with the trainer's default, synchronous saves.
DEFAULT_NOTES = {"checkpoint_mode": "sync with --recovery job-restart, async with --recovery replica"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="Simulate failures, checkpoints and restarts of a training job; report ETTR and goodput.",
        description="Discrete-event simulation of one synchronous training job on a cluster with failures (docs/simulate.md).",
    )
    p.add_argument("--from-plan", metavar="FILE", help="`gigafactory plan --json` output; reads gpus, step_time_s, tokens_per_step, checkpoint_time_s, replica_group_gpus, params.")
    p.add_argument("--rate", metavar="CLASS=PER_DAY", action="append", default=[], help="Override one class's failures per device-day (repeatable).")
    p.add_argument("--sweep", metavar="KEY=V1,V2", help="Run at several values of one knob, e.g. checkpoint_interval=300,600,1200 or gpus=10000,100000.")
    p.add_argument("--plot", metavar="PNG", type=png_file, help="Write the timeline of the first seed (or the sweep curve) to this PNG.")
    p.add_argument("--json", action="store_true", help="Print the results as JSON instead of tables.")
    p.add_argument("--list-classes", action="store_true", help="Print the failure classes (rates and sources) and exit.")
    p.add_argument("--power", action="store_true", help="Add the facility power timeline: MW over time, the largest swing in MW and MW/s, and what smoothing costs (docs/operations.md).")
    p.add_argument("--power-plot", metavar="PNG", type=png_file, help="Write the facility power over time (whole run and around the first failure) to this PNG; implies --power.")
    for section, cls in (*SPECS, ("power", PowerSpec)):
        group = p.add_argument_group(f"{section} ({cls.__doc__.strip()})")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if section == "sim" and f.name == "timeline":
                continue  # implied by --plot
            flag = "--" + RENAMED.get(f.name, f.name.replace("_", "-"))
            kind = hints[f.name]
            default = DEFAULT_NOTES.get(f.name, repr(f.default))
            help_text = f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%")  # argparse formats help with %
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(
                    flag, dest=f.name, type=_typed(flag, kind), default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                    choices=f.metadata.get("choices") or None, help=help_text,
                )
    p.set_defaults(func=run)


def _typed(flag: str, kind: type):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{flag} expects a finite number, got {text!r}")
        return value

    return convert


def build_config(args: argparse.Namespace, gpus: int | None = None) -> SimConfig:
    """SimConfig from defaults, then --from-plan (its entry for `gpus` or --gpus), then explicit flags."""
    given = dict(vars(args))
    if gpus is not None:
        given["gpus"] = gpus
    values: dict[str, typing.Any] = {}
    if getattr(args, "from_plan", None):
        from gigafactory.simulate.plan_input import read_plan

        values.update(read_plan(args.from_plan, given.get("gpus")))
    values.update({k: v for k, v in given.items() if k in _knob_names()})
    if "checkpoint_interval_s" in given and "checkpoint_policy" not in given:
        values["checkpoint_policy"] = "fixed"
    if "checkpoint_mode" not in values:  # each recovery mode with the saves it is run with (docs/simulate.md)
        values["checkpoint_mode"] = "async" if values.get("recovery") == "replica" else "sync"
    if getattr(args, "plot", None) or getattr(args, "power", False) or getattr(args, "power_plot", None):
        values["timeline"] = True
    specs = {}
    for section, cls in SPECS:
        names = {f.name for f in dataclasses.fields(cls)}
        specs[section] = cls(**{k: v for k, v in values.items() if k in names})
    cfg = SimConfig(**specs)
    cfg.validate()
    return cfg


def _knob_names() -> set[str]:
    return {f.name for _, cls in SPECS for f in dataclasses.fields(cls)}


def _rate_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--rate {item!r} must look like CLASS=FAILURES_PER_DEVICE_DAY, e.g. --rate gpu=1.5e-4")
    return out


def _console():
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)  # piped: don't squeeze tables to 80 columns


def run(args: argparse.Namespace) -> int:
    from gigafactory.simulate import plots, report, sweep
    from gigafactory.simulate.failures import job_mtbi_s, load_failure_classes, override_rates
    from gigafactory.simulate.runner import mean_detect_s, simulate

    cfg = build_config(args)
    classes = override_rates(load_failure_classes(cfg.cluster.failure_rates or None), _rate_overrides(args.rate))
    if args.list_classes:
        report.print_classes(classes, _console())
        return 0
    if args.sweep and (args.power or args.power_plot):
        raise UserError("--power/--power-plot need one configuration; drop --sweep (or run each value on its own)")
    if args.sweep:
        key, values = sweep.parse_sweep(args.sweep, cfg)
        if key == "gpus" and args.from_plan:  # each size takes its own step time and checkpoint cost from the plan
            results = [(v, simulate(build_config(args, gpus=int(v)), classes)) for v in values]
        else:
            results = sweep.run_sweep(cfg, key, values, classes)
        rows = sweep.sweep_rows(key, results)
        if args.plot:
            curve = None
            if key == "checkpoint_interval_s":
                r0 = results[0][1]
                curve = plots.interval_curve(
                    cfg.job.stall_s(), cfg.job.restart_s(), job_mtbi_s(classes, r0.cfg.cluster), min(values), max(values),
                    detect_s=mean_detect_s(r0.cfg, classes),
                )
            plots.sweep_png(key, rows, args.plot, curve)
        if args.json:
            json.dump({"sweep": key, "rows": rows, "plot": args.plot}, sys.stdout, indent=2)
            print()
        else:
            report.print_sweep(key, rows, _console())
            if args.plot:
                print(f"wrote {args.plot}")
        return 0
    result = simulate(cfg, classes)
    d = result.to_dict()
    if args.plot:
        plots.timeline_png(result.runs[0], args.plot)
        d["plot"] = args.plot
    if args.power or args.power_plot:
        d["power"] = _power(args, result)
    if args.json:
        json.dump(d, sys.stdout, indent=2)
        print()
    else:
        report.print_report(d, _console())
        if "power" in d:
            report.print_power(d["power"], _console())
        for path in (args.plot, args.power_plot):
            if path:
                print(f"wrote {path}")
    return 0


def _power(args: argparse.Namespace, result) -> dict:
    from gigafactory.simulate import plots
    from gigafactory.simulate.power import power_report, states, trace

    names = {f.name for f in dataclasses.fields(PowerSpec)}
    spec = PowerSpec(**{k: v for k, v in vars(args).items() if k in names})
    cfg = result.cfg
    out = power_report(spec, result.runs, cfg.cluster.gpus, result.interval_s, cfg.job.stall_s())
    if args.power_plot:
        run = result.runs[0]
        segments = states(run, result.interval_s, cfg.job.stall_s())
        curves = {"no smoothing": trace(spec, cfg.cluster.gpus, segments, False)}
        if spec.smoothed:
            curves[f"floor {spec.power_floor:g}, ramp {spec.ramp_s:g} s"] = trace(spec, cfg.cluster.gpus, segments, True)
        plots.power_png(curves, run, args.power_plot, out)
        out["plot"] = args.power_plot
    return out
