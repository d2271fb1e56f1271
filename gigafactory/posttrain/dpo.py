"""Direct preference optimisation on the pre-training Trainer: the policy starts from a checkpoint (pre-trained or
SFT); the reference is that same checkpoint, frozen, its log-probabilities computed once and cached in the run
directory (so a resumed run, whose model is the policy by then, reads them instead of recomputing them).

loss(pair) = -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z),  z = beta * ((pi_c - pi_r) - (ref_c - ref_r))
(Rafailov et al. 2023; ls > 0 is conservative DPO for noisy labels). loss_type "ipo" is (z / beta - 1 / (2 beta))^2
(Azar et al. 2023), "hinge" max(0, 1 - z) (SLiC); sft_weight > 0 adds the chosen reply's per-token NLL (RPO, Pang
et al. 2024), which keeps the chosen answer's likelihood from falling as the margin widens. Rewards beta * (pi - ref) of the chosen and rejected replies,
their margin and how often the chosen one wins are logged each step.

Every layout: a pair's log-probability is a sum over its tokens, so where the sequence is split (sequence parallel
slices, context parallel chunks) each rank sums its part and one differentiable all-reduce adds them; under pipeline
parallel the last stage's loss function computes them from a target that packs targets, document ids and pair slots.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from gigafactory.data.chat import ChatTemplate
from gigafactory.data.preference import PackedPairLoader, pack_pairs, read_preference_jsonl, sequence_logps
from gigafactory.data.sft import split_conversations
from gigafactory.data.tokenizer import load_tokenizer, plain_text_encoder
from gigafactory.errors import UserError
from gigafactory.models.grok.head_loss import IGNORE_INDEX
from gigafactory.parallel.balance import microbatches_per_step
from gigafactory.parallel.context_parallel import shard_sequence
from gigafactory.parallel.sequence_parallel import slice_sequence
from gigafactory.posttrain.options import DPOOptions
from gigafactory.posttrain.sft import SFTData, SFTTrainer

def dpo_loss(pi_c, pi_r, ref_c, ref_r, opts: DPOOptions, chosen_tokens=None) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs and the reward statistics (summed log-probabilities in, one per pair). With
    opts.sft_weight > 0, plus sft_weight * the chosen reply's mean per-token NLL (chosen_tokens: its token counts)."""
    z = opts.beta * ((pi_c - pi_r) - (ref_c - ref_r))
    if opts.loss_type == "sigmoid":
        losses = -(1 - opts.label_smoothing) * F.logsigmoid(z) - opts.label_smoothing * F.logsigmoid(-z)
    elif opts.loss_type == "ipo":
        losses = (z / opts.beta - 1 / (2 * opts.beta)) ** 2
    else:
        losses = torch.relu(1 - z)
    if opts.sft_weight:
        losses = losses - opts.sft_weight * pi_c / chosen_tokens
    chosen, rejected = (opts.beta * (pi_c - ref_c)).detach(), (opts.beta * (pi_r - ref_r)).detach()
    stats = {"reward_chosen": chosen.mean().item(), "reward_rejected": rejected.mean().item(),
             "reward_margin": (chosen - rejected).mean().item(), "reward_accuracy": (chosen > rejected).float().mean().item()}
    return losses.mean(), stats


REWARD_STATS = ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")  # dpo_loss's, logged each step


def per_slot(per_doc_BD: torch.Tensor, pair_docs_BP3: torch.Tensor) -> torch.Tensor:
    """[B, P, 2]: the chosen and rejected documents' values of each pair slot (garbage where a slot is unused)."""
    return torch.stack([per_doc_BD.gather(1, pair_docs_BP3[..., side].clamp(min=0)) for side in (0, 1)], -1)


def token_counts(targets_BS: torch.Tensor, doc_ids_BS: torch.Tensor, n_docs: int) -> torch.Tensor:
    """[B, n_docs]: each document's trained tokens (targets != IGNORE_INDEX)."""
    counts = torch.zeros(targets_BS.shape[0], n_docs + 1, device=targets_BS.device)
    counts.scatter_add_(1, doc_ids_BS.clamp(max=n_docs), (targets_BS != IGNORE_INDEX).float())
    return counts[:, :n_docs]


class DPOTrainer(SFTTrainer):
    """SFTTrainer's checkpoint-as-initial-weights, with pairs instead of conversations and the DPO loss."""

    def __init__(self, cfg, data: SFTData, opts: DPOOptions):
        opts.validate()
        self.opts, self.ref_logps, self.step_stats = opts, None, []
        super().__init__(cfg, data)

    def build_data(self) -> None:
        tokenizer = load_tokenizer(self.sft.base / "tokenizer.json")
        self.tokenizer_json = tokenizer.to_str()
        template = ChatTemplate(tokenizer, plain_text_encoder(tokenizer))
        d, t = self.cfg.data, self.cfg.training
        pairs = read_preference_jsonl(self.sft.chat_jsonl)
        self.data_key = hashlib.sha256(Path(self.sft.chat_jsonl).expanduser().read_bytes() + f"|{d.seq_len}".encode()).hexdigest()[:16]
        for k, p in enumerate(pairs):
            p["index"] = k
        train, held = split_conversations(pairs, self.sft.val_fraction, d.seed)
        self.n_pairs = len(pairs)
        self.splits = {}
        for name, subset in (("train", train), ("val", held)):
            if subset:
                self.splits[name] = pack_pairs(subset, template, d.seq_len)
        self.train_loader = PackedPairLoader(*self.splits["train"], t.batch_size, d.seed, self.dp_rank, self.dims.dp)
        if "val" not in self.splits and t.eval_every:
            raise UserError("no held-out pairs for the eval loss; add pairs, raise --val-fraction, or pass --training.eval_every 0")

    def val_loader(self) -> PackedPairLoader:
        return PackedPairLoader(*self.splits["val"], self.cfg.training.batch_size, 0, self.dp_rank, self.dims.dp, shuffle=False)

    # ---- the frozen reference -----------------------------------------------------------------------------------
    @property
    def ref_path(self) -> Path:
        return self.run_dir / f"reference-logps-{self.data_key}.pt"

    def initial_weights(self) -> None:
        """Load the starting checkpoint, then score every pair with it once: that model is the reference."""
        super().initial_weights()
        ref = torch.zeros(self.n_pairs, 2)
        self.model.eval()
        with torch.no_grad():
            for rows, docs in self.splits.values():  # every rank scores every row (FSDP forwards stay in lockstep)
                if self.pmodel.schedule is not None:
                    self._score_through_pipeline(rows, docs, ref)
                    continue
                loader = PackedPairLoader(rows, docs, 1, 0, shuffle=False)
                for _ in range(loader.n_windows):
                    batch = loader.next_batch()[:5]
                    logps, pair_docs = self.pair_logps(*batch), batch[4].to(self.device)
                    ok = pair_docs[..., 2] >= 0
                    ref[pair_docs[..., 2][ok].cpu()] = logps[ok].float().cpu()
        self.model.train()
        if self.pmodel.schedule is not None:  # the last stage scored them: every stage of its pipeline takes its copy
            group = self.mesh["pp"].get_group()
            ref = ref.to(self.device)
            dist.broadcast(ref, src=dist.get_global_rank(group, self.dims.pp - 1), group=group)
            ref = ref.cpu()
        self.ref_logps = ref
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.ref_path.with_suffix(".tmp")
            torch.save(ref, tmp)
            tmp.replace(self.ref_path)
        if dist.is_initialized():
            dist.barrier()

    def _score_through_pipeline(self, rows, docs, ref: torch.Tensor) -> None:
        """Under pipeline parallel: the last stage's loss function writes each microbatch's pair log-probs into ref
        (one row per microbatch; the loader wraps around, so a last short batch re-scores rows of the first)."""
        n_micro = microbatches_per_step(self.cfg, self.dims)
        loader = PackedPairLoader(rows, docs, n_micro, 0, shuffle=False)

        def record(logits, target, inferring):
            if not inferring:
                logps, _, pair_docs = self._pair_sums(logits, target)
                ok = pair_docs[..., 2] >= 0
                ref[pair_docs[..., 2][ok].cpu()] = logps[ok].float().cpu()
            return logits.new_zeros((), dtype=torch.float32)

        for _ in range(-(-loader.n_windows // n_micro)):
            inputs, stage_kwargs, target, _ = self.pipeline_batch(*loader.next_batch())
            self.run_pipeline(inputs, stage_kwargs, target, record, train=False)

    def maybe_resume(self) -> None:
        super().maybe_resume()
        if self.ref_logps is None:  # resumed: the model is the policy now, so the reference comes from the cache
            if not self.ref_path.is_file():
                raise UserError(f"resuming DPO needs the cached reference log-probs '{self.ref_path}' (same data and data.seq_len); "
                                "start a new run directory")
            self.ref_logps = torch.load(self.ref_path)

    # ---- loss ---------------------------------------------------------------------------------------------------
    def pair_logps(self, inputs, targets, positions, doc_ids, pair_docs, counts: bool = False):
        """[B, P, 2]: summed log-probs of the chosen and rejected replies of each pair slot (garbage where unused);
        with counts=True also their token counts (same shape)."""
        inputs, targets, positions, doc_ids, pair_docs = (x.to(self.device) for x in (inputs, targets, positions, doc_ids, pair_docs))
        n_docs, whole, group = 2 * pair_docs.shape[1], (targets, doc_ids), None
        if self.dims.cp > 1:  # this rank's load-balanced chunks (the keys' document ids are gathered with the keys)
            cp_rank, group = self.mesh["cp"].get_local_rank(), self.mesh["cp"].get_group()
            inputs, targets, positions, doc_ids = (shard_sequence(x, cp_rank, self.dims.cp) for x in (inputs, targets, positions, doc_ids))
        with self.autocast():
            logits = self.pmodel.parts[0](inputs, positions, doc_ids_BS=doc_ids)
        if self.sequence_parallel:  # the head ran on this TP rank's slice of the sequence
            tp_rank, group = self.mesh["tp"].get_local_rank(), self.mesh["tp"].get_group()
            targets, doc_ids = (slice_sequence(x, tp_rank, self.dims.tp) for x in (targets, doc_ids))
        per_doc = sequence_logps(logits, targets, doc_ids, n_docs)
        if group is not None:
            # Every rank's part of each document's sum, added up: the loss is then the whole one on every rank. The
            # all-reduce's backward sums the ranks' gradients (each 1/tp of the whole under sequence parallel, where
            # the trainer divides by tp; whole under context parallel, where FSDP averages over cp), so each part
            # gets its tokens' full gradient.
            per_doc = funcol.wait_tensor(funcol.all_reduce(per_doc, "sum", group))
        logps = per_slot(per_doc, pair_docs)
        return (logps, per_slot(token_counts(*whole, n_docs), pair_docs)) if counts else logps

    def pair_objective(self, logps, tokens, pair_docs) -> tuple[torch.Tensor, dict, float]:
        """(mean loss over the used pair slots, reward statistics, number of pairs) of one batch's pair sums."""
        ok = pair_docs[..., 2] >= 0
        ref = self.ref_logps.to(self.device)[pair_docs[..., 2][ok]]
        loss, stats = dpo_loss(logps[ok][:, 0], logps[ok][:, 1], ref[:, 0], ref[:, 1], self.opts, tokens[ok][:, 0])
        return loss, stats, float(ok.sum())

    def loss_on(self, inputs, targets, positions=None, doc_ids=None, pair_docs=None, n_global=None) -> torch.Tensor:
        """The mean over this rank's pairs, reweighted by its share of the micro-batch's pairs (as SFT's tokens)."""
        logps, tokens = self.pair_logps(inputs, targets, positions, doc_ids, pair_docs, counts=True)
        loss, stats, n_pairs = self.pair_objective(logps, tokens, pair_docs.to(self.device))
        if torch.is_grad_enabled():
            self.step_stats.append(stats)
        return loss * (n_pairs * self.dims.dp / float(n_global))

    def pipeline_batch(self, inputs, targets, positions, doc_ids, pair_docs, n_global):
        """Under pipeline parallel: positions and document ids go to every stage; targets, document ids and pair
        slots travel to the last stage packed in one target tensor (split with the microbatches), whose loss is the
        microbatch's pair mean times its pairs * M * dp / n_global, so the schedule's mean over the M microbatches
        and the gradient mean over data ranks give the mean over the step's pairs."""
        self._packed_widths = (targets.shape[1], pair_docs.shape[1])
        scale = microbatches_per_step(self.cfg, self.dims) * self.dims.dp / max(float(n_global), 1.0)

        def pair_loss(logits, target, inferring):
            logps, tokens, pair_docs = self._pair_sums(logits, target)
            loss, stats, n_pairs = self.pair_objective(logps, tokens, pair_docs)
            if torch.is_grad_enabled() and not inferring:
                self.step_stats.append(stats)
            return loss * (n_pairs * scale)

        packed = torch.cat([targets, doc_ids, pair_docs.flatten(1)], dim=1)
        return inputs, {"positions_BS": positions, "doc_ids_BS": doc_ids}, packed, pair_loss

    def _pair_sums(self, logits, packed):
        """The last stage's (log-probs, token counts, pair slots) of a microbatch from pipeline_batch's packed target."""
        seq_len, slots = self._packed_widths
        targets, doc_ids = packed[:, :seq_len], packed[:, seq_len:2 * seq_len]
        pair_docs = packed[:, 2 * seq_len:].reshape(-1, slots, 3)
        per_doc = sequence_logps(logits, targets, doc_ids, 2 * slots)
        return per_slot(per_doc, pair_docs), per_slot(token_counts(targets, doc_ids, 2 * slots), pair_docs), pair_docs

    def train_step(self) -> dict:
        values = super().train_step()
        if "loss" in values:  # a step every rank finished alike (not a rollback or an abandoned one)
            # this step's microbatches (and a re-run's), averaged over the ranks that computed them (under pipeline
            # parallel the last stages: the others add zeros, and reduce_loss scales the mean by pp)
            for key in REWARD_STATS:
                mine = sum(s[key] for s in self.step_stats) / len(self.step_stats) if self.step_stats else 0.0
                values[key] = self.reduce_loss(mine)
        self.step_stats = []
        return values
