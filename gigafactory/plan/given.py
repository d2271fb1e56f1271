"""A layout the user gives (`--layout tp=8,pp=16,cp=1,dp=64,ep=1` or a TOML `[parallel]` table): parse it, say in
one line why it cannot run, price it exactly, and measure how far the search's choice is from it.

`dp` is the data-parallel size; it becomes dp_shard under ZeRO >= 1 and dp_replicate under ZeRO 0 (DDP), unless
dp_replicate and dp_shard are given (HSDP). Expert parallelism borrows its ranks from the data-parallel ranks, as
in the rest of the planner; a trainer `[parallel]` table (ep as its own mesh axis) is converted on reading.
"""

from __future__ import annotations

import dataclasses
import re

from gigafactory.errors import UserError
from gigafactory.plan.cost import StepEstimate
from gigafactory.plan.layout import CHECKPOINTING, PRECISIONS, REDUCE_DTYPES, SCHEDULES, Layout
from gigafactory.plan.memory import GIB
from gigafactory.plan.pipeline import check_schedule, check_stages
from gigafactory.plan.workload import Workload

KEYS = ("tp", "pp", "cp", "ep", "dp", "dp_replicate", "dp_shard", "v")
COMPARED = ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp", "microbatch_size", "microbatches", "schedule",
            "zero", "checkpointing", "stage_layers")


def parse_degrees(text: str) -> dict[str, int]:
    """`tp=8,pp=16,cp=1,dp=64,ep=1` -> {'tp': 8, ...}; one-line UserError on anything else."""
    out: dict[str, int] = {}
    shown = repr(text) if len(text) <= 80 else repr(text[:60] + "...")
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in KEYS:
            raise UserError(f"--layout {shown}: {part[:40]!r} is not KEY=N with KEY one of {', '.join(KEYS)}")
        if key in out:
            raise UserError(f"--layout {shown}: {key} is given twice")
        if not re.fullmatch(r"-?[0-9]{1,9}", value):
            raise UserError(f"--layout {shown}: {key}={value[:20]!r} is not a whole number below 10^9")
        out[key] = int(value)
        if out[key] < 1:
            raise UserError(f"--layout {shown}: {key}={out[key]} must be >= 1")
    if not out:
        raise UserError("--layout is empty; give e.g. tp=8,pp=16,cp=1,dp=64,ep=1")
    return out


def parse_stage_layers(text: str) -> tuple[int, ...]:
    """`7+8+8+7` (or commas) -> (7, 8, 8, 7)."""
    parts = [x.strip() for x in text.replace(",", "+").split("+") if x.strip()]
    if not parts or not all(re.fullmatch(r"[0-9]{1,9}", x) for x in parts):
        raise UserError(f"--stage-layers {text[:60]!r} must be layer counts joined by '+', e.g. 7+8+8+7")
    return tuple(int(x) for x in parts)


def build_layout(degrees: dict[str, int], *, microbatch_size: int = 1, microbatches: int = 0, schedule: str = "1f1b",
                 zero: int = 1, checkpointing: str = "none", precision: str = "bf16", reduce_dtype: str = "fp32",
                 stage_layers: tuple[int, ...] = (), batch_sequences: int = 0, sequence_parallel: bool = True) -> Layout:
    """A Layout from degrees and options; microbatches 0 = as many as reach `batch_sequences`."""
    for name, value, allowed in (("schedule", schedule, SCHEDULES), ("checkpointing", checkpointing, CHECKPOINTING),
                                 ("precision", precision, PRECISIONS), ("reduce dtype", reduce_dtype, REDUCE_DTYPES)):
        if value not in allowed:
            raise UserError(f"{name} {value!r} is not one of {', '.join(allowed)}")
    if zero not in (0, 1, 2, 3):
        raise UserError(f"--zero {zero} must be 0 (DDP), 1, 2 or 3")
    if microbatch_size < 1 or microbatches < 0:
        raise UserError(f"microbatch size ({microbatch_size}) must be >= 1 and microbatches ({microbatches}) >= 0")
    if "dp_replicate" in degrees or "dp_shard" in degrees:
        if "dp" in degrees and degrees["dp"] != degrees.get("dp_replicate", 1) * degrees.get("dp_shard", 1):
            raise UserError(f"dp={degrees['dp']} is not dp_replicate x dp_shard = "
                            f"{degrees.get('dp_replicate', 1)} x {degrees.get('dp_shard', 1)}")
        replicate, shard = degrees.get("dp_replicate", 1), degrees.get("dp_shard", 1)
    else:
        dp = degrees.get("dp", 1)
        replicate, shard = (dp, 1) if zero == 0 else (1, dp)
    v = degrees.get("v", 2 if schedule == "interleaved_1f1b" else 1)
    dp = replicate * shard
    if microbatches == 0:
        microbatches = max(1, round(batch_sequences / (dp * microbatch_size))) if batch_sequences else 1
    return Layout(dp_replicate=replicate, dp_shard=shard, tp=degrees.get("tp", 1), pp=degrees.get("pp", 1),
                  ep=degrees.get("ep", 1), cp=degrees.get("cp", 1), microbatch_size=microbatch_size,
                  microbatches=microbatches, schedule=schedule, virtual_stages=v, checkpointing=checkpointing,
                  sequence_parallel=sequence_parallel, zero=zero if shard > 1 else 0, reduce_dtype=reduce_dtype,
                  precision=precision, stage_layers=tuple(stage_layers))


def from_trainer_table(table: dict, batch_size: int, gpus: int) -> Layout:
    """The planner's Layout for a trainer `[parallel]` table (+ [training] batch_size) on `gpus` GPUs."""
    get = lambda key, default: int(table.get(key, default))  # noqa: E731
    tp, pp, ep, cp, replicate, shard = get("tp", 1), get("pp", 1), get("ep", 1), get("cp", 1), get("dp_replicate", 1), get("dp_shard", -1)
    if shard == -1:
        rest = tp * pp * ep * cp * replicate
        if gpus % rest:
            raise UserError(f"[parallel] dp_shard = -1 cannot be inferred: {gpus} GPUs is not a multiple of "
                            f"dp_replicate*tp*pp*ep*cp = {rest}")
        shard = gpus // rest
    schedule = str(table.get("schedule", "1f1b"))
    microbatches = get("microbatches", 0) or (2 * pp if pp > 1 else 1)
    return build_layout({"tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp_replicate": replicate, "dp_shard": shard * ep},
                        microbatch_size=batch_size, microbatches=microbatches, schedule=schedule,
                        zero=3 if shard * ep > 1 else 0, checkpointing=str(table.get("activation_checkpointing", "none")))


def check_layout(w: Workload, lay: Layout, seq_len: int, gpus: int) -> None:
    """One-line UserError naming the first reason this layout cannot run the model (divisibility, sizes)."""
    if lay.world > gpus:
        raise UserError(f"layout needs {lay.world:,} GPUs (dp {lay.dp} x cp {lay.cp} x tp {lay.tp} x pp {lay.pp}) but --gpus is {gpus:,}")
    if w.n_heads % lay.tp or (w.n_kv_heads % lay.tp and lay.tp % w.n_kv_heads):
        raise UserError(f"tp={lay.tp} does not divide the {w.n_heads} query heads / {w.n_kv_heads} KV heads")
    if w.ffn_dim % lay.tp:
        raise UserError(f"tp={lay.tp} does not divide the MLP width {w.ffn_dim}")
    if lay.ep > 1 and (not w.is_moe or w.n_experts % lay.ep):
        raise UserError(f"ep={lay.ep} does not divide the {w.n_experts} experts" if w.is_moe else f"ep={lay.ep} but {w.name} has no experts")
    if (lay.dp * lay.cp) % lay.ep:
        raise UserError(f"ep={lay.ep} must divide the data ranks it borrows (dp x cp = {lay.dp * lay.cp})")
    if lay.sharded and (lay.dp_shard * lay.cp) % lay.ep:
        raise UserError(f"ep={lay.ep} must divide dp_shard x cp = {lay.dp_shard * lay.cp} (the expert states' shard group)")
    if seq_len % (2 * lay.cp) and lay.cp > 1:
        raise UserError(f"cp={lay.cp} needs the sequence ({seq_len}) divisible by 2 x cp (load-balanced chunks)")
    if lay.pp > w.n_layers:
        raise UserError(f"pp={lay.pp} is more stages than the model's {w.n_layers} layers")
    if lay.schedule != "1f1b" and lay.pp == 1 and lay.schedule != "gpipe":
        raise UserError(f"schedule {lay.schedule} needs pp > 1")
    check_stages(lay, w.n_layers)
    check_schedule(lay, w.n_layers)


def fit_verdict(est: StepEstimate, hbm_gb: float) -> str:
    """'' when it fits, else one line: the peak, where, and what would shrink it."""
    mem = est.memory
    if est.fits:
        return ""
    lay = est.layout
    hints = []
    if lay.checkpointing != "full":
        hints.append("activation checkpointing")
    if lay.dp_shard == 1 or lay.zero < 3:
        hints.append("a higher --zero stage over a larger dp_shard")
    hints.append("more pp/tp")
    gib = lambda nbytes: f"{nbytes / GIB:.1f}" if nbytes < 1e6 * GIB else f"{nbytes / GIB:.3g}"  # noqa: E731
    return (f"does not fit: {gib(mem.total)} GiB on pipeline stage {mem.stage} > {hbm_gb * 1e9 / GIB:.1f} GiB "
            f"(states {gib(mem.states)}, activations {gib(mem.activations)}, buffers {gib(mem.buffers)}, "
            f"reserved {gib(mem.reserved)}); try " + ", ".join(hints))


def distance(given: StepEstimate, found: StepEstimate) -> dict:
    """How far the search's layout is from the given one: the fields that differ and the speed ratio per token."""
    a, b = dataclasses.asdict(given.layout), dataclasses.asdict(found.layout)
    a["stage_layers"], b["stage_layers"] = list(given.stage_layers), list(found.stage_layers)
    changed = {k: [a[k], b[k]] for k in COMPARED if a[k] != b[k]}
    if "pp" in changed:
        changed.pop("stage_layers", None)  # a different pp implies a different split
    speedup = (given.step_time_s / given.tokens_per_step) / (found.step_time_s / found.tokens_per_step)
    return {"changed": changed, "speedup_per_token": speedup, "fields_changed": len(changed)}


def describe_distance(d: dict) -> str:
    if not d["changed"]:
        return "the search picks this same layout"
    parts = [f"{k} {v[0]}->{v[1]}" for k, v in d["changed"].items() if k != "stage_layers"]
    if "stage_layers" in d["changed"]:
        parts.append("stages " + "+".join(map(str, d["changed"]["stage_layers"][1])))
    return f"the search's layout differs in {d['fields_changed']} field(s) ({', '.join(parts)}) and is {d['speedup_per_token']:.2f}x as fast per token"
