"""JobConfig: the one typed config tree a training or generation job reads (model, data, optimizer, ...)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.models.config import ConfigError, ModelConfig


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token sequences."""

    inputs: list[str] = knob(
        factory=list, help="Text files (.txt = one document per file, .jsonl = one {'text': ...} per line, optionally .gz); empty = the shipped KJV corpus."
    )
    tokenizer: str = knob("", "Path to a tokenizer.json; empty = train a byte-level BPE of model.vocab_size on the inputs.")
    cache_dir: str = knob("~/.cache/gigafactory", "Where trained tokenizers and token shards are kept (keyed by inputs and vocab).")
    seq_len: int = knob(256, "Tokens per training sequence; must be <= model.max_seq_len.")
    val_fraction: float = knob(0.02, "Fraction of tokens held out for the evaluation loss (seeded blocks of up to 4096 tokens, so one document can be split).")
    seed: int = knob(1234, "Seed of the sequence order; the same seed gives the same data order.")


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = knob(3e-3, "Peak learning rate.")
    min_lr_ratio: float = knob(0.1, "Final learning rate as a fraction of lr (cosine floor).")
    warmup_steps: int = knob(30, "Linear warmup steps from 0 to lr.")
    weight_decay: float = knob(0.1, "Decoupled weight decay on matrices (not on norms or the router).")
    beta1: float = knob(0.9, "AdamW beta1.")
    beta2: float = knob(0.95, "AdamW beta2.")
    eps: float = knob(1e-8, "AdamW epsilon.")
    grad_clip: float = knob(1.0, "Clip the global gradient norm to this; 0 disables clipping.")


@dataclass
class TrainingConfig:
    """The training loop."""

    steps: int = knob(200, "Optimizer steps to train (the cosine schedule ends here).")
    batch_size: int = knob(16, "Sequences per micro-batch per data-parallel rank.")
    grad_accum_steps: int = knob(1, "Micro-batches accumulated per optimizer step.")
    seed: int = knob(0, "Seed of the weight init (the same on every rank and layout).")
    dtype: str = knob("auto", "Compute dtype via autocast: bf16, fp32, or auto (bf16 where the device supports it).", choices=("auto", "bf16", "fp32"))
    device: str = knob("auto", "cpu, cuda, or auto (cuda when available).", choices=("auto", "cpu", "cuda"))
    eval_every: int = knob(50, "Evaluate the held-out loss every N steps (and at step 0 and the end); 0 = never.")
    eval_batches: int = knob(8, "Micro-batches averaged for one evaluation.")
    compile: bool = knob(False, "torch.compile each block (slow to start on CPU; worth it on GPUs).")
    threads: int = knob(0, "CPU threads for torch; 0 = torch's default.")
    precision: str = knob("bf16", "GEMM precision: bf16 (the compute dtype) or fp8 (torchao float8 for the attention and dense projections; experts, router, head and norms stay in the compute dtype).", choices=("bf16", "fp8"))
    fp8_recipe: str = knob("rowwise", "Float8 scaling with precision=fp8: rowwise (per-row scales, the accurate default) or tensorwise (one scale per tensor; FSDP then gathers weights in float8).", choices=("rowwise", "tensorwise"))


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size (-1 = infer from the world size)."""

    dp_replicate: int = knob(1, "Data-parallel replicas (HSDP outer dimension).")
    dp_shard: int = knob(-1, "Data-parallel FSDP shards; -1 = whatever the world size leaves.")
    tp: int = knob(1, "Tensor-parallel degree (with sequence parallel).")
    pp: int = knob(1, "Pipeline stages.")
    ep: int = knob(1, "Expert-parallel degree.")
    cp: int = knob(1, "Context-parallel degree.")
    sequence_parallel: bool = knob(True, "With tp > 1, split activations outside attention and experts along the sequence (Megatron SP).")
    schedule: str = knob("1f1b", "Pipeline schedule when pp > 1.", choices=("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"))
    microbatches: int = knob(0, "Pipeline microbatches per step; 0 = 2 * pp.")
    activation_checkpointing: str = knob("none", "Recompute activations in backward: none, selective (attention only) or full (each block).", choices=("none", "selective", "full"))


@dataclass
class CheckpointConfig:
    """Distributed (DCP) checkpoints."""

    every: int = knob(100, "Save a checkpoint every N steps (and at the end); 0 = only at the end.")
    keep: int = knob(2, "Keep the newest K checkpoints.")
    resume: str = knob("auto", "auto = resume from the newest checkpoint in the run directory; never = start fresh.", choices=("auto", "never"))
    memory_every: int = knob(0, "Also checkpoint to host memory (memory_dir) every N steps: a restart loads the newest of memory and disk (and, under fault tolerance, of its peer groups' memory copies on this host); 0 = off.")
    memory_dir: str = knob("/dev/shm/gigafactory", "A tmpfs (RAM-backed) directory for memory checkpoints; they outlive the processes, not the machine, and are removed when the run finishes.")


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    run_dir: str = knob("runs/grok-tiny", "Run directory: config, tokenizer, checkpoints, metrics.jsonl, TensorBoard events.")
    log_every: int = knob(10, "Write a metrics line every N steps.")
    tensorboard: bool = knob(True, "Also write TensorBoard events under run_dir/tb.")
    progress: bool = knob(True, "Show a progress bar with ETA.")
    peak_tflops: float = knob(0.0, "Device peak TFLOP/s for MFU; 0 = a built-in guess for the device.")


EVAL_SUITES = ("kjv", "harness:<task>")  # built by posttrain/eval_suites.py; named here so a typo fails at load


@dataclass
class EvalConfig:
    """Task suites scored during training, at the eval points of training.eval_every whose step is a multiple of
    eval.every of them, and the last: the scores `gigafactory eval` gives, logged as eval/<suite>/<score> and written
    to RUN/eval-step-N.json + .md (train/evaluation.py)."""

    tasks: list[str] = knob(factory=list, help="Suites to run: kjv (the KJV task's answer log-likelihood and token accuracy, held-out preference accuracy), harness:<task> (an lm-evaluation-harness task; local YAML via harness_include). Empty = none.")
    every: int = knob(1, "Run the suites at the eval points whose step is a multiple of training.eval_every x N (step 0 included), and at the last step.")
    limit: int = knob(50, "KJV held-out items: the first N (at most 200) for exact match and the answer scores, a seeded draw of N for the preferences, as `gigafactory eval --limit N --pref-limit N`; and documents per harness task.")
    exact_match: bool = knob(False, "kjv: also score exact match by greedy decoding (slow: one generation per item).")
    harness_include: str = knob("", "A directory of lm-eval task YAML files for harness:<task> suites.")

    def validate(self) -> None:
        for name in self.tasks:
            if name != "kjv" and not (name.startswith("harness:") and name[len("harness:"):].strip()):
                raise ConfigError(f"eval.tasks: unknown suite {name!r}; known suites: {', '.join(EVAL_SUITES)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"eval.tasks={self.tasks!r} names a suite twice")
        _check(self, "eval.", [("every", self.every >= 1, "must be >= 1"), ("limit", self.limit >= 1, "must be >= 1")])


ANOMALY_ACTIONS = ("skip", "rollback", "stop")


@dataclass
class ResilienceConfig:
    """Failure detection and recovery: watchdog, NaN/spike handling, restarts, async checkpoints, stragglers, signals."""

    watchdog_timeout_s: float = knob(600.0, "A rank that completes no step for this long is declared hung and exits non-zero, so torchrun restarts the job; 0 = off.")
    rerun_anomalies: bool = knob(True, "Re-run a step whose loss or gradient norm is NaN/Inf or spiked, on the same batch, before acting: a different result is a transient fault (the re-run's update is kept); the same result is a real anomaly and on_nan/on_spike act.")
    on_nan: str = knob("skip", "A real NaN/Inf loss or gradient norm: skip the update, roll back to the last good checkpoint and go on past the offending batches, or stop.", choices=ANOMALY_ACTIONS)
    spike_zscore: float = knob(6.0, "A loss more than this many standard deviations above the recent mean is a spike; 0 = off.")
    spike_window: int = knob(50, "Number of recent losses the spike detector's mean and deviation are computed over.")
    on_spike: str = knob("skip", "A real loss spike: skip the update, roll back to the last good checkpoint and go on past the offending batches, or stop.", choices=ANOMALY_ACTIONS)
    max_rollbacks: int = knob(3, "Rollbacks allowed for anomalies at the same step; one more stops training with a non-zero exit.")
    max_restarts: int = knob(3, "Restart budget of torchrun's elastic agent (--max-restarts) for `gigafactory train --nproc N`.")
    async_checkpoint: bool = knob(False, "Save checkpoints with DCP async_save: the step waits only for the copy to host memory; the save commits in the background as soon as it is written.")
    verify: str = knob("sha256", "How a checkpoint is checked against its manifest before loading: sha256, size (fast), or none.", choices=("sha256", "size", "none"))
    term_grace_s: float = knob(120.0, "On SIGTERM or Ctrl-C: finish the step, save and exit; past this many seconds exit anyway (the previous checkpoint stays intact).")
    straggler_every: int = knob(10, "Straggler hunting: time each rank's compute vs its wait at a one-number all-reduce every step, and every N steps compare the ranks' medians over those N steps and name the slow ones; 0 = off.")
    straggler_ratio: float = knob(1.2, "A rank whose median compute time per step exceeds the fleet median by this factor is named as a straggler.")
    straggler_policy: str = knob("warn", "A named straggler: warn (event + console line) or exclude (also add its host to RUN_DIR/bad_nodes.json, which `gigafactory launch --exclude` and the generated job scripts read at the next launch or restart).", choices=("warn", "exclude"))
    power_floor: float = knob(0.0, "Power smoothing: while a checkpoint save or the start-up load runs, keep the device busy this fraction of the time with filler matmuls (0-1), so the site's power does not drop to idle; costs about (floor x busy - idle) W per GPU during every pause (docs/operations.md).")
    power_ramp_s: float = knob(0.0, "Power smoothing: after every (re)start, throttle training so its share of compute time rises linearly from max(power_floor, 0.1) to 1 over this many seconds; costs about power_ramp_s x (1 - that)^2 / 2 seconds of training per start. 0 = off.")
    events_file: str = knob("events.jsonl", "Recovery events log, relative to logging.run_dir (read by `gigafactory report`).")

    def validate(self) -> None:
        _check(self, "resilience.", [
            ("watchdog_timeout_s", self.watchdog_timeout_s >= 0, "must be >= 0 (0 = off)"),
            ("spike_zscore", self.spike_zscore >= 0, "must be >= 0 (0 = off)"),
            ("spike_window", self.spike_window >= 2, "must be >= 2"),
            ("max_rollbacks", self.max_rollbacks >= 0, "must be >= 0"),
            ("max_restarts", self.max_restarts >= 0, "must be >= 0"),
            ("term_grace_s", self.term_grace_s > 0, "must be > 0"),
            ("straggler_every", self.straggler_every >= 0, "must be >= 0 (0 = off)"),
            ("straggler_ratio", self.straggler_ratio >= 1, "must be >= 1"),
            ("power_floor", 0 <= self.power_floor <= 1, "must be in [0, 1] (a fraction of the time the device is kept busy)"),
            ("power_ramp_s", 0 <= self.power_ramp_s <= 3600, "must be in [0, 3600] seconds (0 = off)"),
            ("events_file", bool(self.events_file.strip()), "must name a file"),
        ])


@dataclass
class FaultToleranceConfig:
    """Replica-group fault tolerance on torchft: the data-parallel replicate axis spans independent replica groups
    (each one torchrun job with any layout inside); a failed group drops out of the per-step quorum while the others
    keep stepping, and rejoins by copying model, optimizer, step and data position from a live peer."""

    enabled: bool = knob(False, "Train as one of several torchft replica groups (`train --nproc N` starts the lighthouse and one torchrun per group).")
    replica_groups: int = knob(2, "Replica groups; `train --nproc N` gives each N / replica_groups processes. The global batch is this many group batches.")
    replica_id: int = knob(0, "This process's replica group, 0 .. replica_groups-1 (set per group by the launcher).")
    min_replicas: int = knob(1, "Groups that must be in a step's quorum for it to commit; below it the live groups wait.")
    lighthouse: str = knob("", "The torchft lighthouse address (http://host:port); `train --nproc` and `gigafactory launch` start one and fill it in.")
    timeout_s: float = knob(30.0, "Cross-group collectives, commit votes and peer state transfer fail after this long (a dead or hung peer group is dropped then).")
    quorum_timeout_s: float = knob(120.0, "How long a group waits for a quorum to form before failing the step.")
    join_timeout_ms: int = knob(2000, "Lighthouse started by `train --nproc` or `gigafactory launch`: how long a quorum waits for heartbeating groups that have not asked to join.")
    heartbeat_timeout_ms: int = knob(3000, "Lighthouse started by `train --nproc` or `gigafactory launch`: a group silent this long is considered dead.")
    sync: str = knob("ddp", "How replica groups (sites) synchronise: ddp = average gradients every step; localsgd = average weights every sync_every steps; diloco = outer Nesterov step on the averaged weight change every sync_every steps; streaming_diloco = diloco on `fragments` slices of the model, one slice every sync_every/fragments steps (docs/cross-site.md).", choices=("ddp", "localsgd", "diloco", "streaming_diloco"))
    sync_every: int = knob(1, "localsgd/diloco: inner steps H each group takes alone between cross-group syncs (ddp: must be 1).")
    outer_lr: float = knob(0.7, "diloco: learning rate of the outer SGD step on the averaged pseudo-gradient (DiLoCo paper: 0.7).")
    outer_momentum: float = knob(0.9, "diloco: momentum of the outer SGD step (DiLoCo paper: 0.9).")
    outer_nesterov: bool = knob(True, "diloco: Nesterov momentum for the outer step (DiLoCo paper: on; no effect at outer_momentum 0).")
    fragments: int = knob(1, "streaming_diloco: slices of consecutive layers the model is split into; slice k syncs at the end of every sync_every/fragments-step sub-interval in turn, so each slice still syncs every sync_every steps and one sync sends ~1/fragments of the model.")
    fragment_sync_delay: int = knob(0, "streaming_diloco: inner steps a slice's pseudo-gradient allreduce overlaps with training before its outer step (tau in the Streaming DiLoCo paper; < sync_every/fragments).")
    fragment_update_alpha: float = knob(0.0, "streaming_diloco: after a slice's outer step, weights = lerp(global, local, alpha) (0 = take the global weights).")
    compression: str = knob("none", "diloco/streaming_diloco: wire format of the pseudo-gradient allreduce: none (fp32), bf16 (cast before the allreduce), fp8 (torchft's quantized allreduce: fp8, or int8 on GPUs without fp8; needs CUDA and triton).", choices=("none", "bf16", "fp8"))
    link_delay_ms: float = knob(0.0, "Simulated cross-site link: latency added to each cross-group weight/gradient transfer (a sleep; 0 = off).")
    link_gbps: float = knob(0.0, "Simulated cross-site link: bandwidth in Gbit/s; each transfer also sleeps its bytes / this (0 = unlimited).")

    def validate(self) -> None:
        _check(self, "fault_tolerance.", [
            ("replica_groups", self.replica_groups >= 1, "must be >= 1"),
            ("replica_id", 0 <= self.replica_id < self.replica_groups, f"must be in 0 .. replica_groups-1 = {self.replica_groups - 1}"),
            ("min_replicas", 1 <= self.min_replicas <= self.replica_groups, f"must be in 1 .. replica_groups = {self.replica_groups}"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("quorum_timeout_s", self.quorum_timeout_s > 0, "must be > 0"),
            ("join_timeout_ms", self.join_timeout_ms >= 0, "must be >= 0"),
            ("heartbeat_timeout_ms", self.heartbeat_timeout_ms > 0, "must be > 0"),
            ("sync_every", self.sync_every >= 1, "must be >= 1"),
            ("outer_lr", self.outer_lr > 0, "must be > 0"),
            ("outer_momentum", 0 <= self.outer_momentum < 1, "must be in [0, 1)"),
            ("link_delay_ms", self.link_delay_ms >= 0, "must be >= 0"),
            ("link_gbps", self.link_gbps >= 0, "must be >= 0 (0 = unlimited)"),
            ("fragments", self.fragments >= 1, "must be >= 1"),
            ("fragment_sync_delay", self.fragment_sync_delay >= 0, "must be >= 0"),
            ("fragment_update_alpha", 0 <= self.fragment_update_alpha <= 1, "must be in [0, 1]"),
        ])
        if self.sync == "ddp" and self.sync_every != 1:
            raise ConfigError(f"fault_tolerance.sync_every={self.sync_every} needs fault_tolerance.sync=localsgd or diloco (ddp syncs every step)")
        streaming = self.sync == "streaming_diloco"
        if not streaming and (self.fragments, self.fragment_sync_delay, self.fragment_update_alpha) != (1, 0, 0.0):
            raise ConfigError("fault_tolerance.fragments/fragment_sync_delay/fragment_update_alpha need fault_tolerance.sync=streaming_diloco")
        if self.compression != "none" and self.sync not in ("diloco", "streaming_diloco"):
            raise ConfigError(f"fault_tolerance.compression={self.compression} needs fault_tolerance.sync=diloco or streaming_diloco (it compresses pseudo-gradients)")
        if streaming and self.sync_every % self.fragments:
            raise ConfigError(f"fault_tolerance.sync_every={self.sync_every} must be a multiple of fault_tolerance.fragments={self.fragments} (one slice syncs every sync_every/fragments steps)")
        if streaming and self.fragment_sync_delay >= self.sync_every // self.fragments:
            raise ConfigError(f"fault_tolerance.fragment_sync_delay={self.fragment_sync_delay} must be < sync_every/fragments = {self.sync_every // self.fragments} (a slice's sync must finish before the next slice's starts)")


@dataclass
class FaultConfig:
    """Deliberate failures for tests and drills. Steps count from 1; 0 = off. Each fault fires once per run directory."""

    kill_rank: int = knob(0, "Rank that SIGKILLs itself at kill_step (after its backward pass, mid-step).")
    kill_step: int = knob(0, "Step at which kill_rank is killed; 0 = never.")
    hang_rank: int = knob(0, "Rank that stops making progress at hang_step (sleeps forever before the step).")
    hang_step: int = knob(0, "Step at which hang_rank hangs; 0 = never.")
    nan_rank: int = knob(0, "Rank whose gradient gets a NaN at nan_step.")
    nan_step: int = knob(0, "Step whose gradients get a NaN (after backward, before clipping); 0 = never.")
    spike_rank: int = knob(0, "Rank whose loss and gradients are multiplied by spike_scale at spike_step.")
    spike_step: int = knob(0, "Step whose loss spikes (loss and gradients scaled by spike_scale); 0 = never.")
    spike_scale: float = knob(20.0, "Factor the spiked step's loss and gradients are multiplied by.")
    anomaly_repeats: int = knob(1, "Runs of the step that show the injected NaN/spike: 1 = a transient fault (a re-run is clean), 2 or more = a real one (the re-run shows it too).")
    delay_rank: int = knob(-1, "Rank that sleeps delay_s before every step (a slow node; in drills, a stand-in for a longer step); -1 = every rank.")
    delay_s: float = knob(0.0, "Seconds delay_rank sleeps before every step; 0 = off.")
    delay_from_step: int = knob(0, "The delay starts at this step (a node that turns slow mid-run); 0 = from the first step.")
    replica_id: int = knob(-1, "With fault tolerance: the replica group whose ranks the faults above hit; -1 = every group.")
    corrupt_latest: str = knob("none", "Damage the checkpoint saved at corrupt_step right after it is written.", choices=("none", "truncate", "flip"))
    corrupt_step: int = knob(0, "Step whose checkpoint is damaged; 0 = the first checkpoint saved.")
    fail_save_step: int = knob(0, "The save at this step fails with OSError(ENOSPC) before it is committed; 0 = never.")

    @property
    def any(self) -> bool:
        return bool(self.kill_step or self.hang_step or self.nan_step or self.spike_step or self.corrupt_latest != "none" or self.fail_save_step
                    or self.delay_s)

    def validate(self) -> None:
        _check(self, "faults.", [("replica_id", self.replica_id >= -1, "must be >= -1 (-1 = every group)")])
        ints = ("kill_rank", "kill_step", "hang_rank", "hang_step", "nan_rank", "nan_step", "spike_rank", "spike_step", "corrupt_step", "fail_save_step")
        _check(self, "faults.", [(key, getattr(self, key) >= 0, "must be >= 0") for key in ints] + [
            ("spike_scale", self.spike_scale > 1, "must be > 1"),
            ("anomaly_repeats", self.anomaly_repeats >= 1, "must be >= 1"),
            ("delay_rank", self.delay_rank >= -1, "must be >= -1 (-1 = every rank)"),
            ("delay_s", 0 <= self.delay_s <= 3600, "must be in [0, 3600] seconds"),
            ("delay_from_step", self.delay_from_step >= 0, "must be >= 0 (0 = from the first step)"),
        ])


def _check(cfg, prefix: str, checks: list[tuple[str, bool, str]]) -> None:
    """Raise a ConfigError for the first failed (key, ok, fix); key is a (dotted) attribute path under cfg."""
    for key, ok, fix in checks:
        if not ok:
            raise ConfigError(f"{prefix}{key}={functools.reduce(getattr, key.split('.'), cfg)!r} {fix}")


@dataclass
class JobConfig:
    model: ModelConfig = knob(factory=ModelConfig, help="Model architecture.")
    data: DataConfig = knob(factory=DataConfig, help="Data.")
    optimizer: OptimizerConfig = knob(factory=OptimizerConfig, help="Optimizer and schedule.")
    training: TrainingConfig = knob(factory=TrainingConfig, help="Training loop.")
    parallel: ParallelConfig = knob(factory=ParallelConfig, help="Parallelism.")
    checkpoint: CheckpointConfig = knob(factory=CheckpointConfig, help="Checkpoints.")
    logging: LoggingConfig = knob(factory=LoggingConfig, help="Logging.")
    resilience: ResilienceConfig = knob(factory=ResilienceConfig, help="Failure detection and recovery.")
    fault_tolerance: FaultToleranceConfig = knob(factory=FaultToleranceConfig, help="Replica-group fault tolerance (torchft).")
    faults: FaultConfig = knob(factory=FaultConfig, help="Fault injection for tests and drills.")
    eval: EvalConfig = knob(factory=EvalConfig, help="Task suites scored during training.")

    def validate(self) -> None:
        self.model.validate()
        self.resilience.validate()
        self.faults.validate()
        self.fault_tolerance.validate()
        self.eval.validate()
        if self.eval.tasks and not self.training.eval_every:
            raise ConfigError(f"eval.tasks={self.eval.tasks!r} run at eval points: set training.eval_every > 0")
        if self.fault_tolerance.enabled and "rollback" in (self.resilience.on_nan, self.resilience.on_spike):
            raise ConfigError("resilience.on_nan/on_spike=rollback is not supported with fault_tolerance.enabled (a rollback would "
                              "leave the other replica groups); use skip or stop")
        checks = [
            ("data.seq_len", self.data.seq_len > 0, "must be > 0"),
            ("data.seq_len", self.data.seq_len <= self.model.max_seq_len, f"must be <= model.max_seq_len={self.model.max_seq_len}"),
            ("data.val_fraction", 0 < self.data.val_fraction < 1, "must be between 0 and 1"),
            ("optimizer.lr", self.optimizer.lr > 0, "must be > 0"),
            ("optimizer.min_lr_ratio", 0 <= self.optimizer.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("optimizer.warmup_steps", self.optimizer.warmup_steps >= 0, "must be >= 0"),
            ("optimizer.grad_clip", self.optimizer.grad_clip >= 0, "must be >= 0 (0 disables clipping)"),
            ("optimizer.beta1", 0 <= self.optimizer.beta1 < 1, "must be in [0, 1)"),
            ("optimizer.beta2", 0 <= self.optimizer.beta2 < 1, "must be in [0, 1)"),
            ("training.steps", self.training.steps > 0, "must be > 0"),
            ("training.batch_size", self.training.batch_size > 0, "must be > 0"),
            ("training.grad_accum_steps", self.training.grad_accum_steps > 0, "must be > 0"),
            ("training.eval_every", self.training.eval_every >= 0, "must be >= 0"),
            ("training.eval_batches", self.training.eval_batches > 0, "must be > 0"),
            ("training.threads", self.training.threads >= 0, "must be >= 0 (0 = torch's default)"),
            ("checkpoint.every", self.checkpoint.every >= 0, "must be >= 0"),
            ("checkpoint.keep", self.checkpoint.keep > 0, "must be > 0"),
            ("checkpoint.memory_every", self.checkpoint.memory_every >= 0, "must be >= 0 (0 = off)"),
            ("logging.log_every", self.logging.log_every > 0, "must be > 0"),
        ]
        _check(self, "", checks)
        if self.parallel.microbatches < 0:
            raise ConfigError(f"parallel.microbatches={self.parallel.microbatches} must be >= 0 (0 = 2 * pp)")
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp"):
            value = getattr(self.parallel, key)
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}={value} must be a positive degree or -1 (infer)")

