"""Supervised fine-tuning: train.trainer.Trainer with packed, loss-masked conversations and pre-trained weights.

Everything else is the pre-training loop's: layouts (data, FSDP, tensor/sequence, expert, pipeline, context), checkpoints
and resume, resilience, metrics. The checkpoints it writes are ordinary ones (config.toml, tokenizer.json), so
generate, serve and export load them as they load pre-trained ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gigafactory.config.job import JobConfig
from gigafactory.config.loader import config_to_toml, load_config
from gigafactory.data.chat import ChatTemplate
from gigafactory.data.sft import PackedChatLoader, build_rows, read_chat_jsonl, split_conversations
from gigafactory.data.tokenizer import load_tokenizer, plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.models.grok.head_loss import IGNORE_INDEX
from gigafactory.parallel.balance import microbatches_per_step
from gigafactory.parallel.context_parallel import shard_sequence
from gigafactory.parallel.sequence_parallel import slice_sequence
from gigafactory.posttrain.lora import LoRA
from gigafactory.posttrain.options import LoRAOptions
from gigafactory.train.checkpoint import load_checkpoint
from gigafactory.train.checkpoint_files import resolve_checkpoint
from gigafactory.train.optim import build_optimizer
from gigafactory.train.trainer import Trainer

# Fine-tuning settings that differ from pre-training's; a --section.key flag still wins.
SFT_DEFAULTS = {"optimizer.lr": 3e-4, "optimizer.warmup_steps": 5, "optimizer.weight_decay": 0.0, "training.steps": 100,
                "training.eval_every": 25}


@dataclass
class SFTData:
    """What `gigafactory sft` adds to a job config."""

    base: Path  # the pre-trained checkpoint directory (config.toml, tokenizer.json, DCP shards)
    chat_jsonl: str  # OpenAI-style {"messages": [...]} lines
    val_fraction: float = 0.05  # held-out conversations for the eval loss (assistant tokens only)
    lora: LoRAOptions = field(default_factory=LoRAOptions)  # rank 0: full fine-tune


def sft_config(base_checkpoint: str, args=None, run_dir: str | None = None, overrides: dict | None = None,
               defaults: dict | None = None, suffix: str = "-sft") -> tuple[Path, JobConfig]:
    """The base checkpoint and the job config: its config.toml, `defaults` (SFT_DEFAULTS), then the user's flags and
    overrides; the run directory defaults to the base run's path + suffix."""
    base = resolve_checkpoint(base_checkpoint)
    if not (base / "config.toml").is_file() or not (base / "tokenizer.json").is_file():
        raise UserError(f"checkpoint '{base}' lacks config.toml or tokenizer.json; it was not written by `gigafactory train`")
    given = set(vars(args)) if args is not None else set()
    given |= set(overrides or {})
    # the user's --config file above the command's defaults, both below the flags
    layered = {**(SFT_DEFAULTS if defaults is None else defaults), **user_config_file(args)}
    values = {k: v for k, v in layered.items() if k not in given}
    values["logging.run_dir"] = run_dir or str(Path(base_checkpoint).expanduser().resolve()) + suffix
    values.update(overrides or {})
    if args is not None and "logging.run_dir" in vars(args):
        values.pop("logging.run_dir")
    cfg = load_config(args, config_path=str(base / "config.toml"), overrides=values)
    return base, cfg


def user_config_file(args) -> dict:
    """The keys of the user's --config FILE, dotted ("eval.limit"): the base run's config.toml is the file the
    config is built on, so the user's would otherwise be ignored without a word."""
    from gigafactory.config.loader import read_toml

    path = getattr(args, "config", None) if args is not None else None
    dotted = {}
    for section, table in (read_toml(path) if path else {}).items():
        if not isinstance(table, dict):
            raise UserError(f"config key {section!r} in {path} must be a table like [{section}]")
        dotted.update({f"{section}.{key}": value for key, value in table.items()})
    return dotted


class NoOptimizer(list):
    """An empty list of optimizers for get_state_dict (a LoRA checkpoint keeps no optimizer state), usable as the
    checkpointer's weak dictionary key as an optimizer is."""

    __hash__ = object.__hash__


class SFTTrainer(Trainer):
    def __init__(self, cfg: JobConfig, sft: SFTData):
        self.sft, self.lora = sft, None
        sft.lora.validate()
        if sft.lora.rank and cfg.fault_tolerance.enabled:
            raise UserError("--lora.rank with fault_tolerance.enabled is not supported (replica groups average the model's "
                            "gradients, not the adapters'); set fault_tolerance.enabled=false")
        super().__init__(cfg)
        if sft.lora.rank:  # the base is frozen; the optimizer holds the adapters only (sharded as the layout needs)
            self.lora = LoRA(self.model, sft.lora, seed=cfg.data.seed, mesh=self.mesh, sequence_parallel=self.sequence_parallel)
            self.optimizer = build_optimizer(self.lora, cfg.optimizer)

    def build_data(self) -> None:
        tokenizer = load_tokenizer(self.sft.base / "tokenizer.json")
        if tokenizer.get_vocab_size() > self.cfg.model.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size is {self.cfg.model.vocab_size}")
        self.tokenizer_json = tokenizer.to_str()
        template = ChatTemplate(tokenizer, plain_text_encoder(tokenizer))
        d, t = self.cfg.data, self.cfg.training
        train, held = split_conversations(read_chat_jsonl(self.sft.chat_jsonl), self.sft.val_fraction, d.seed)
        self.train_loader = PackedChatLoader(build_rows(train, template, d.seq_len, d.seed), t.batch_size, d.seed, self.dp_rank, self.dims.dp)
        self.val_rows = build_rows(held, template, d.seq_len, d.seed) if held else None
        if self.val_rows is None and t.eval_every:
            raise UserError("no held-out conversations for the eval loss; add conversations, raise --val-fraction, or pass --training.eval_every 0")

    def loss_on(self, inputs, targets, positions=None, doc_ids=None, n_global=None) -> torch.Tensor:
        """The rank's token mean, reweighted by its share of the micro-batch's trained tokens (n_global over every
        rank): the mean over ranks that the gradient averaging forms is then the global token mean, as on one
        process, however unevenly the assistant tokens fall on the ranks. Under sequence or context parallel a rank's
        loss covers its part of the sequence (its slice; its load-balanced chunks, whose document ids it passes on:
        the keys' ids are gathered with the keys)."""
        if self.dims.cp > 1 and doc_ids is not None:  # Trainer.loss_on takes this rank's chunks of the rest
            doc_ids = shard_sequence(doc_ids, self.mesh["cp"].get_local_rank(), self.dims.cp)
        loss = super().loss_on(inputs, targets, positions, doc_ids)
        if n_global is None:
            return loss
        if self.sequence_parallel:
            parts, local = self.dims.tp, slice_sequence(targets, self.mesh["tp"].get_local_rank(), self.dims.tp)
        elif self.dims.cp > 1:
            parts, local = self.dims.cp, shard_sequence(targets, self.mesh["cp"].get_local_rank(), self.dims.cp)
        else:
            parts, local = 1, targets
        return loss * (float((local != IGNORE_INDEX).sum()) * self.dims.dp * parts / float(n_global))

    def pipeline_batch(self, inputs, targets, positions, doc_ids, n_global):
        """Under pipeline parallel: positions and document ids go to every stage with their microbatch, and each
        microbatch's loss is its summed token loss times M * dp / n_global (M microbatches), so the schedule's mean
        over microbatches and the gradient mean over data ranks give the global token mean of the step's batch."""
        scale = microbatches_per_step(self.cfg, self.dims) * self.dims.dp / max(float(n_global), 1.0)

        def summed_token_loss(logits, target, inferring):
            nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            return nll * scale

        return inputs, {"positions_BS": positions, "doc_ids_BS": doc_ids}, targets, summed_token_loss

    def val_loader(self) -> PackedChatLoader:
        return PackedChatLoader(self.val_rows, self.cfg.training.batch_size, 0, self.dp_rank, self.dims.dp, shuffle=False)

    def initial_weights(self) -> None:
        """A fresh SFT run starts from the pre-trained weights (the optimizer starts fresh)."""
        self._check_same_model(self.sft.base)
        load_checkpoint(self.sft.base, self.model)
        self.events.record("sft_init", once=True, path=str(self.sft.base))

    # ---- LoRA: adapters train, checkpoints hold the merged weights ------------------------------------------------
    def forward_backward(self, step: int) -> tuple[float, float]:
        loss, grad_norm = super().forward_backward(step)
        if self.lora is None:
            return loss, grad_norm
        # The base has no gradients (nothing for FSDP to reduce); the adapters' are averaged here, over the pipeline
        # microbatches too (the schedule divides only its stages' gradients by their count).
        self.lora.sync_grads(microbatches_per_step(self.cfg, self.dims) if self.dims.pp > 1 else 1)
        return loss, float(self.lora.clip_grads(self.cfg.optimizer.grad_clip))

    def save(self, checkpointer=None):
        """With LoRA: an ordinary checkpoint of W + (alpha / r) B A (no adapter keys, no optimizer state), so
        generate, serve and export load it unchanged."""
        if self.lora is None:
            return super().save(checkpointer)
        train_state = {"step": self.step, "loader": self.train_loader.state_dict(), "guard": json.dumps(self.guard.state_dict())}
        side = {"config.toml": config_to_toml(self.cfg), "tokenizer.json": self.tokenizer_json}
        with self.lora.merged():  # an async save has staged the state in host memory when save() returns
            return self._guarded(lambda: (checkpointer or self.checkpointer).save(self.step, self.model, NoOptimizer(), train_state, side))

    def load(self, path: Path, keep_data_position: bool = False) -> None:
        """With LoRA: the merged weights become the new frozen base and training goes on with fresh adapters
        (B = 0: the same function) and fresh optimizer state; the step, data position and detector are restored."""
        if self.lora is None:
            return super().load(path, keep_data_position)
        state = load_checkpoint(path, self.model, None, {"step": 0, "loader": self.train_loader.state_dict(), "guard": ""})
        self.step = int(state["step"])
        if not keep_data_position:
            self.train_loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(json.loads(state["guard"] or "{}"), keep_rollback_counts=keep_data_position)
        self.lora.restart(seed=self.cfg.data.seed + self.step)
        self.optimizer.state.clear()
