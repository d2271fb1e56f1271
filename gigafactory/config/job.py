"""JobConfig: the one typed config tree a training or generation job reads (model, data, optimizer, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from gigafactory.config.fields import knob
from gigafactory.models.config import ConfigError, ModelConfig
from gigafactory.resilience.config import FaultConfig, ResilienceConfig


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token sequences."""

    inputs: list[str] = knob(
        factory=list, help="Text files (.txt = one document per file, .jsonl = one {'text': ...} per line, optionally .gz); empty = the shipped KJV corpus."
    )
    tokenizer: str = knob("", "Path to a tokenizer.json; empty = train a byte-level BPE of model.vocab_size on the inputs.")
    cache_dir: str = knob("~/.cache/gigafactory", "Where trained tokenizers and token shards are kept (keyed by inputs and vocab).")
    seq_len: int = knob(256, "Tokens per training sequence; must be <= model.max_seq_len.")
    val_fraction: float = knob(0.02, "Fraction of documents held out for the evaluation loss.")
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


@dataclass
class LoggingConfig:
    """Metrics and progress."""

    run_dir: str = knob("runs/grok-tiny", "Run directory: config, tokenizer, checkpoints, metrics.jsonl, TensorBoard events.")
    log_every: int = knob(10, "Write a metrics line every N steps.")
    tensorboard: bool = knob(True, "Also write TensorBoard events under run_dir/tb.")
    progress: bool = knob(True, "Show a progress bar with ETA.")
    peak_tflops: float = knob(0.0, "Device peak TFLOP/s for MFU; 0 = a built-in guess for the device.")


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
    faults: FaultConfig = knob(factory=FaultConfig, help="Fault injection for tests and drills.")

    def validate(self) -> None:
        self.model.validate()
        self.resilience.validate()
        self.faults.validate()
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
            ("checkpoint.every", self.checkpoint.every >= 0, "must be >= 0"),
            ("checkpoint.keep", self.checkpoint.keep > 0, "must be > 0"),
            ("logging.log_every", self.logging.log_every > 0, "must be > 0"),
        ]
        for key, ok, fix in checks:
            if not ok:
                raise ConfigError(f"{key}={_get(self, key)!r} {fix}")
        if self.parallel.microbatches < 0:
            raise ConfigError(f"parallel.microbatches={self.parallel.microbatches} must be >= 0 (0 = 2 * pp)")
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep", "cp"):
            value = getattr(self.parallel, key)
            if value == 0 or value < -1:
                raise ConfigError(f"parallel.{key}={value} must be a positive degree or -1 (infer)")


def _get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)
