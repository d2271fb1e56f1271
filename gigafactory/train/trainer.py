"""The training loop: data -> model -> AdamW, with evaluation, checkpoints, metrics, recovery and clean interruption."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from gigafactory.config.job import FaultConfig, JobConfig
from gigafactory.config.loader import config_to_toml
from gigafactory.data.loader import PackedSequenceLoader
from gigafactory.data.shards import open_split, prepare_dataset
from gigafactory.data.tokenizer import load_tokenizer
from gigafactory.errors import UserError
from gigafactory.models import training_flops_per_token
from gigafactory.parallel.build import build_parallel_model, sequence_parallel
from gigafactory.parallel.context_parallel import shard_sequence
from gigafactory.parallel.sequence_parallel import slice_sequence
from gigafactory.parallel.distributed import all_reduce_mean, destroy_distributed, init_distributed
from gigafactory.resilience import AnomalyGuard, EventLog, FaultInjector, StragglerMonitor, Watchdog, record_start
from gigafactory.train import checkpoint as ckpt
from gigafactory.train.checkpoint_files import list_checkpoints, remove_stale, usable_checkpoints
from gigafactory.train.devices import pick_device, pick_dtype
from gigafactory.train.evaluation import TaskSuites, eval_point
from gigafactory.train.host_reads import read_scalars, sum_on_device, to_device, wide_float
from gigafactory.train.interrupt import StopSignals
from gigafactory.train.memory_checkpoint import MemoryCheckpoints
from gigafactory.train.metrics import BoardPower, MetricsLogger, StepProgress, peak_tflops
from gigafactory.train.optim import build_optimizer, clip_grad_norm_, lr_at
from gigafactory.train.pipeline_step import PipelineStep
from gigafactory.train.power_smoothing import PowerSmoothing
from gigafactory.train.preflight import check_run_dir
from gigafactory.train.quorum_step import abandon_step, join_quorum
from gigafactory.train.replica_groups import ReplicaGroupSync
from gigafactory.train.startup import check_layout, check_same_model, collective_timeout_s, data_rank


class Trainer(PipelineStep):
    """Pre-training as is; post-training (gigafactory/posttrain) subclasses it and overrides the hooks build_data,
    val_loader and initial_weights (and loss_on, pipeline_batch, save, load), so SFT and DPO run on the same loop,
    layouts, checkpoints and resilience. The pipeline-parallel step is train/pipeline_step.py's mixin."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        if cfg.training.threads:
            torch.set_num_threads(cfg.training.threads)
        self.device = pick_device(cfg.training.device)
        self.dims = check_layout(cfg, self.device)  # fails on a bad layout before any process group exists
        r = cfg.resilience
        self.rank, self.world_size = init_distributed(self.device.type, timeout_s=collective_timeout_s(r))
        if self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.mesh = self.dims.build_mesh(self.device.type) if self.world_size > 1 else None
        self.dp_rank = data_rank(self.mesh, self.dims)
        self.dtype = pick_dtype(cfg.training.dtype, self.device)
        self.run_dir = check_run_dir(cfg.logging.run_dir)
        ft = cfg.fault_tolerance
        if ft.enabled:  # each replica group keeps its own checkpoints, events and metrics
            self.run_dir = self.run_dir / f"group{ft.replica_id}"
        self.ckpt_root = self.run_dir / "checkpoints"

        d, t = cfg.data, cfg.training
        self.build_data()

        self.pmodel = build_parallel_model(cfg, self.dims, self.mesh, self.device, self.dtype)
        self.sequence_parallel = sequence_parallel(cfg, self.dims)
        for moe in self.pmodel.moe_layers():  # under SP every TP rank adds the (full-token) aux gradient; count it once
            moe.aux_loss_scale = 1.0 / (t.grad_accum_steps * (self.dims.tp if self.sequence_parallel else 1))
        self.model = self.pmodel.view  # single-device parameter names, whatever the layout
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.step = 0
        self.aux_loss = 0.0  # the last step's summed router losses (forward_backward reads it with the loss)
        self.flops_per_token = training_flops_per_token(cfg.model, d.seq_len)
        self.peak = peak_tflops(self.device, cfg.logging.peak_tflops) * 1e12
        self.save_failure: ckpt.CheckpointSaveError | None = None
        self.task_suites: TaskSuites | None = None  # eval.tasks' suites, attached by the command that builds the trainer

        self.events = EventLog(self.run_dir / r.events_file, rank=self.rank, echo=True)
        faults = cfg.faults if not ft.enabled or cfg.faults.replica_id in (-1, ft.replica_id) else FaultConfig()
        self.faults = FaultInjector(faults, self.rank, self.run_dir, self.events)
        self.checkpointer = ckpt.Checkpointer(self.ckpt_root, cfg.checkpoint.keep, async_save=r.async_checkpoint, log_event=self.events,
                                              hooks=ckpt.CommitHooks(self.faults.before_save, self.faults.after_save))
        self.signals = StopSignals(r.term_grace_s, self.events)
        self.guard = AnomalyGuard(r, self.events)
        self.stragglers = StragglerMonitor(r.straggler_every, r.straggler_ratio, self.events, device=self.device,
                                           policy=r.straggler_policy, run_dir=self.run_dir, board_power=BoardPower(self.device))
        self.power = PowerSmoothing(r.power_floor, r.power_ramp_s, self.device)  # docs/operations.md, "Power"
        self.watchdog = Watchdog(r.watchdog_timeout_s, self.rank, self.events,
                                 heartbeat_path=self.run_dir / "heartbeat.json" if self.rank == 0 else None)
        self.ft = ReplicaGroupSync(ft, self, self.events) if ft.enabled else None
        c = cfg.checkpoint
        self.memory = MemoryCheckpoints(c.memory_dir, c.memory_every, Path(cfg.logging.run_dir), self.run_dir.name if ft.enabled else None,
                                        self.events) if c.memory_every else None
        self.group_windows = t.batch_size * t.grad_accum_steps * self.dims.dp  # sequences in one group batch
        self.tokens_per_step = self.group_windows * d.seq_len

    # ---- hooks (overridden by post-training) ---------------------------------------------------------------------
    def build_data(self) -> None:
        """Set tokenizer_json and train_loader; a loader's next_batch() tuple is loss_on's arguments."""
        d, t = self.cfg.data, self.cfg.training
        # One process per machine tokenizes; the others wait and then find it in the cache.
        first_on_node = int(os.environ.get("LOCAL_RANK", "0")) == 0
        if self.world_size > 1 and not first_on_node:
            dist.barrier()
        self.dataset_dir = prepare_dataset(d.inputs, self.cfg.model.vocab_size, d.cache_dir, d.val_fraction, d.seed, d.tokenizer)
        if self.world_size > 1 and first_on_node:
            dist.barrier()
        self.tokenizer_json = load_tokenizer(self.dataset_dir / "tokenizer.json").to_str()
        self.train_loader = PackedSequenceLoader(open_split(self.dataset_dir, "train"), d.seq_len, t.batch_size, d.seed, self.dp_rank, self.dims.dp)
        self.val_tokens = open_split(self.dataset_dir, "val")

    def val_loader(self):
        """A fresh, unshuffled loader over the held-out data (this rank's slice)."""
        t = self.cfg.training
        return PackedSequenceLoader(self.val_tokens, self.cfg.data.seq_len, t.batch_size, 0, self.dp_rank, self.dims.dp, shuffle=False)

    def initial_weights(self) -> None:
        """Called when the run starts with nothing to resume (weights are then init_weights'): pre-training keeps
        them; fine-tuning loads its base checkpoint's."""

    # ---- state -------------------------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        """Load the newest checkpoint that verifies and loads, falling back past damaged ones (each reported). A run
        that has checkpoints but none usable stops: starting over must be asked for (checkpoint.resume=never)."""
        if self.cfg.checkpoint.resume == "never":
            return self.initial_weights()
        remove_stale(self.ckpt_root)
        found = list_checkpoints(self.ckpt_root) + ([p for root in self.memory.roots() for p in list_checkpoints(root)] if self.memory else [])
        if not found:
            return self.initial_weights()
        if self.load_newest_usable() is None:
            raise UserError(f"none of the {len(found)} checkpoint(s) in '{self.ckpt_root}' is usable (see the lines above); "
                            "repair or remove them, or pass --checkpoint.resume never to start over")

    def load_newest_usable(self, keep_data_position: bool = False) -> Path | None:
        """Load the newest checkpoint that verifies (resilience.verify) and loads; each one skipped is reported.
        Returns its path, or None when there is none. Collective."""
        verify = self.cfg.resilience.verify
        full, check = verify == "sha256", verify != "none"
        paths = self.memory.candidates(self.ckpt_root, self.events, full, check) if self.memory else \
            usable_checkpoints(self.ckpt_root, self.events, full=full, verify=check)
        for path in paths:
            self._check_same_model(path)
            try:
                self.load(path, keep_data_position)
                self.events.record("resume", once=True, step=self.step, path=str(path),
                                   source="memory" if self.memory and self.memory.is_memory(path) else "disk")
                return path
            except UserError as err:  # files present and verified (or no manifest) but unloadable: damaged
                self.events.record("checkpoint_corrupt", once=True, path=str(path), problems=[f"load failed: {err}"])
        return None

    def _check_same_model(self, path: Path) -> None:
        check_same_model(self.cfg, path)

    def load(self, path: Path, keep_data_position: bool = False) -> None:
        template = {"step": 0, "loader": self.train_loader.state_dict(), "guard": ""}
        state = ckpt.load_checkpoint(path, self.model, self.optimizer, template)
        self.step = int(state["step"])
        if not keep_data_position:
            self.train_loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(json.loads(state["guard"] or "{}"), keep_rollback_counts=keep_data_position)

    def save(self, checkpointer: ckpt.Checkpointer | None = None) -> Path | None:
        """Checkpoint now (async: committed in the background as soon as written), to disk or the given (memory)
        checkpointer. A failed save is logged and remembered, and training goes on: the previous one is intact."""
        train_state = {"step": self.step, "loader": self.train_loader.state_dict(), "guard": json.dumps(self.guard.state_dict())}
        side = {"config.toml": config_to_toml(self.cfg), "tokenizer.json": self.tokenizer_json}
        return self._guarded(lambda: (checkpointer or self.checkpointer).save(self.step, self.model, self.optimizer, train_state, side))

    def finish_saves(self) -> Path | None:
        """Wait for an async save still in flight (the checkpointer stays usable: rollbacks call this mid-run)."""
        return self._guarded(self.checkpointer.finalize)

    def _guarded(self, commit) -> Path | None:
        """Run a checkpoint save with the watchdog paused; remember a failure (logged by the checkpointer)."""
        try:
            with self.watchdog.paused(), self.power.paused():
                return commit()
        except ckpt.CheckpointSaveError as err:
            self.save_failure = err
            return None

    # ---- steps -------------------------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def loss_on(self, inputs: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Mean token loss of this rank's part of the batch (its sequence chunks under context parallel). Packed
        documents (SFT) come with per-document positions and document ids; targets of -100 add no loss."""
        inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
        if positions is None:
            positions = torch.arange(inputs.shape[1], device=self.device).expand_as(inputs)
        positions = to_device(positions, self.device)
        doc_ids = None if doc_ids is None else to_device(doc_ids, self.device)
        if self.dims.cp > 1:
            cp_rank = self.mesh["cp"].get_local_rank()
            inputs, targets, positions = (shard_sequence(x, cp_rank, self.dims.cp) for x in (inputs, targets, positions))
        if self.sequence_parallel:  # the head sees this TP rank's slice of the sequence
            targets = slice_sequence(targets, self.mesh["tp"].get_local_rank(), self.dims.tp)
        with self.autocast():
            return self.pmodel.parts[0](inputs, positions, targets_BS=targets, doc_ids_BS=doc_ids)

    def reduce_loss(self, local: float | torch.Tensor) -> float | torch.Tensor:
        """Average over the ranks holding losses (under pipeline parallel, only the last stage does). A float comes
        back a float; a device tensor stays one (reduced in place of a host round trip)."""
        return all_reduce_mean(local, self.device) * (self.dims.pp if self.dims.pp > 1 else 1)

    def forward_backward(self, step: int) -> tuple[float, float]:
        """Gradients of one step's batch; (global mean loss, global gradient norm after clipping). The loss, norm
        and router losses (left in self.aux_loss) stay on the device until one batched read at the end."""
        t, o = self.cfg.training, self.cfg.optimizer
        total_loss = None
        for _ in range(t.grad_accum_steps):
            if self.pmodel.schedule is not None:
                part = self.pipeline_loss(*self.train_loader.next_batch(), train=True)
            else:
                loss = self.loss_on(*self.train_loader.next_batch())
                # Under sequence parallel each TP rank's loss covers 1/tp of the tokens: the objective is their mean.
                (loss / (t.grad_accum_steps * (self.dims.tp if self.sequence_parallel else 1))).backward()
                part = loss.detach().to(wide_float(loss.device)) / t.grad_accum_steps  # float64, as the host added
            total_loss = part if total_loss is None else total_loss + part
        total_loss = total_loss * self.faults.after_backward(step, self.model)
        for hook in self.pmodel.after_backward:
            hook()
        loss = self.reduce_loss(total_loss)
        if self.ft is not None and self.ft.per_step:  # ddp: average over the replica groups of this step's quorum
            loss = self.ft.sync(list(self.model.parameters()), loss)  # a device tensor: still one read, below
        pp_group = self.mesh["pp"].get_group() if self.dims.pp > 1 else None
        grad_norm = clip_grad_norm_(list(self.model.parameters()), o.grad_clip, pp_group, self.tied_copies())
        aux = sum_on_device([m.last_aux_loss for m in self.pmodel.moe_layers()])
        loss, grad_norm, self.aux_loss = read_scalars(loss, grad_norm, aux)  # the step's one host read
        return loss, grad_norm  # the same numbers on every rank: every rank decides alike

    def train_step(self) -> dict:
        """One optimizer step, guarded: a NaN/Inf or spiking step is re-run on the same batch; a transient fault keeps
        the re-run, a real anomaly skips the update, rolls back or stops (config)."""
        t, o = self.cfg.training, self.cfg.optimizer
        replica = join_quorum(self) if self.ft is not None else {}
        step = self.step + 1
        self.faults.before_step(step)
        self.stragglers.sync_point()  # compute vs wait: the slow rank arrives last and waits least
        lr = lr_at(self.step, t.steps, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        data_position, guard_state = self.train_loader.state_dict(), self.guard.state_dict()
        loss, grad_norm = self.forward_backward(step)
        if self.ft is not None and self.ft.errored():  # a peer group failed mid-step: no group commits this step
            return abandon_step(self, guard_state)
        verdict = self.guard.check(step, loss, grad_norm)
        if verdict.action == "rerun":
            self.optimizer.zero_grad(set_to_none=True)
            self.train_loader.load_state_dict(data_position)
            first_loss = loss
            loss, grad_norm = self.forward_backward(step)
            verdict = self.guard.judge_rerun(step, verdict, first_loss, loss, grad_norm)
        if self.ft is not None and self.ft.per_step and not self.ft.should_commit():
            return abandon_step(self, guard_state)
        if verdict.action == "ok":
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if verdict.action == "rollback":
            return self.rollback(step)
        if verdict.action == "stop":
            raise UserError(f"training stopped at step {step}: {verdict.note or f'{verdict.reason} (resilience.on_{verdict.reason}=stop)'}; "
                            "the newest checkpoint is intact")
        self.step = step
        if self.ft is not None and not self.ft.end_step(step, t.steps):  # localsgd/diloco: the interval's sync failed
            self.step = self.ft.interval_start  # weights are back at the last sync; the interval is re-run
            return {"retry": True}
        if self.ft is not None:  # the data position torchft counts (group batches committed by every group)
            self.train_loader.consumed = self.ft.batches_committed() * self.group_windows
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "aux_loss": self.aux_loss, "skipped": verdict.action == "skip", **replica}

    def rollback(self, step: int) -> dict:
        """Reload the newest good checkpoint (model, optimizer, detector) and go on from there on fresh data: the
        batches consumed since that checkpoint are skipped, since replaying them would reproduce the anomaly."""
        self.finish_saves()
        with self.watchdog.paused():
            loaded = self.load_newest_usable(keep_data_position=True)
        if loaded is None:
            raise UserError(f"step {step} asked for a rollback but there is no good checkpoint yet; use resilience.on_nan/on_spike=skip")
        self.events.record("rollback", once=True, step=step, from_step=step, to_step=self.step, steps_lost=step - 1 - self.step,
                           batches_skipped=step - self.step, data_position=self.train_loader.consumed)
        return {"rolled_back": True}

    @torch.no_grad()
    def evaluate(self) -> float:
        t = self.cfg.training
        loader = self.val_loader()
        self.model.eval()
        n_batches = min(t.eval_batches, max(1, loader.n_windows // (t.batch_size * self.dims.dp)))
        if self.pmodel.schedule is not None:
            losses = [float(self.pipeline_loss(*loader.next_batch(), train=False)) for _ in range(n_batches)]
        else:
            losses = [self.loss_on(*loader.next_batch()).item() for _ in range(n_batches)]
        self.model.train()
        return self.reduce_loss(sum(losses) / len(losses))

    # ---- loop --------------------------------------------------------------------------------------------------
    def train(self, stop_at: int | None = None) -> dict:
        """Train to training.steps (or stop early at step `stop_at`, saving a checkpoint as an interruption would)."""
        cfg, t = self.cfg, self.cfg.training
        is_rank0 = self.rank == 0
        if is_rank0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(config_to_toml(cfg))
            (self.run_dir / "tokenizer.json").write_text(self.tokenizer_json)
        self.power.starting()  # the floor holds through the load until the first step
        if self.ft is None:  # under fault tolerance the first quorum decides: heal from a peer, or resume from disk
            self.maybe_resume()
        metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, enabled=is_rank0)
        progress = StepProgress(t.steps, self.step, enabled=is_rank0 and cfg.logging.progress)
        self.signals.install()
        summary: dict = {"start_step": self.step, "eval": []}
        if self.ft is None:  # under fault tolerance, once the first quorum said where this group starts
            self.mark_started()
        path = None
        try:
            if t.eval_every and self.step == 0 and not (self.ft is not None and list_checkpoints(self.ckpt_root)):
                eval_point(self, metrics, progress, summary)
            while self.step < min(t.steps, stop_at or t.steps) and not self.signals.requested(self.device):
                self.signals.step = self.step
                started = time.perf_counter()
                values = self.train_step()
                elapsed = time.perf_counter() - started
                self.watchdog.beat(self.step)
                with self.watchdog.paused():
                    self.power.step_done(elapsed)  # ends the start-up floor; throttles during the ramp
                if values.get("rolled_back") or values.get("retry"):
                    continue
                if (board := self.stragglers.step_done(self.step, elapsed) or {}).get("per_rank_board_w"):
                    values["board_power_w"] = board["per_rank_board_w"]
                values.update(step_time=elapsed, tokens_per_s=self.tokens_per_step / elapsed)
                if self.peak:  # 0 for a GPU the catalog lacks
                    values["mfu"] = values["tokens_per_s"] * self.flops_per_token / (self.peak * self.world_size)
                if self.device.type == "cuda":
                    values["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                log_now = self.step % cfg.logging.log_every == 0 or self.step == t.steps
                if log_now:
                    metrics.log(self.step, values)
                progress.update(self.step, f"loss {values['loss']:.3f} | {values['tokens_per_s']:.0f} tok/s", log_now)
                if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                    eval_point(self, metrics, progress, summary)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < t.steps:
                    self.save()
                elif self.memory and self.memory.due(self.step) and self.step < t.steps:
                    self.save(self.memory.checkpointer)
            self.save_failure = None  # earlier failed saves were superseded if this one commits
            path = self.save()
            path = self.finish_saves() or path
            if self.save_failure is not None:
                raise UserError(f"the final checkpoint (step {self.step}) could not be saved: {self.save_failure.reason}; "
                                f"{self._newest_hint()} — free space or fix the storage, then run again to resume")
            progress.print(("interrupted: " if self.signals.signum else "") + f"saved checkpoint {path}")
            if self.memory is not None and self.rank == 0 and self.step >= t.steps:
                self.memory.remove()
            self.events.record("finish", once=True, step=self.step, interrupted=self.signals.name)
        finally:
            self.watchdog.stop(finished=self.step >= t.steps and self.save_failure is None)
            self.power.close()
            self.signals.restore()
            progress.close()
            metrics.close()
        summary.update(end_step=self.step, interrupted=self.signals.name, checkpoint=str(path))
        return summary

    def mark_started(self) -> None:
        """Record the run's start (reading the previous attempt's heartbeat before the watchdog overwrites it) and
        start the watchdog."""
        record_start(self.events, self.run_dir / "heartbeat.json", self.step, self.world_size, self.tokens_per_step)
        self.watchdog.start(self.step)

    def _newest_hint(self) -> str:
        found = list_checkpoints(self.ckpt_root)
        return f"the newest checkpoint is {found[-1].name}" if found else "no checkpoint was saved"

    def close(self) -> None:
        """Leave the process groups in order; call on every rank after train() returned."""
        self.checkpointer.close()
        if self.memory is not None:
            self.memory.checkpointer.close()
        if self.ft is not None:
            self.ft.shutdown()
        destroy_distributed()

