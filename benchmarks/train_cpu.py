"""Training-step throughput of grok-tiny vs Hugging Face transformers' Mixtral of the same shape, in one process.

Both models: same layers, d_model, heads, KV heads, experts, top-k, expert width, vocab, sequence and batch; AdamW;
forward + backward + step; the same autocast dtype; router aux loss on. Runs alternate so machine noise hits both.

    .venv/bin/python benchmarks/train_cpu.py [--dtype bf16|fp32] [--steps 6] [--batch 16] [--seq 256]
    python3 benchmarks/train_cpu.py --device cuda --preset grok-1b-moe --dtype bf16 --batch 4 --seq 2048  (gpu.sh)
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from gigafactory.models import GrokModel, get_preset


def hf_mixtral(cfg, seq):
    from transformers import MixtralConfig, MixtralForCausalLM

    hf_cfg = MixtralConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.moe_ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=seq,
        tie_word_embeddings=cfg.tie_embeddings, output_router_logits=True, router_aux_loss_coef=cfg.aux_loss_weight,
        rope_theta=cfg.rope_theta,
        attn_implementation="sdpa",
    )
    return MixtralForCausalLM(hf_cfg)


def time_steps(step, steps: int, sync) -> list[float]:
    step()  # warm-up
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="fp32", choices=("bf16", "fp32"), help="bf16 only pays on CPUs with avx512_bf16 or AMX.")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of (ours, HF).")
    parser.add_argument("--preset", default="grok-tiny", help="grok-tiny (Grok-1 architecture) or mixtral-tiny (Mixtral's own).")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()

    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    ours = GrokModel(cfg).to(args.device)
    ours.init_weights(0)
    theirs = hf_mixtral(cfg, args.seq).to(args.device)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=args.device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()
    sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, foreach=True)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, foreach=True)

    def step_ours():
        with autocast:  # the trainer's loss: cross-entropy fused with the head (models/grok/head_loss.py)
            loss = ours(inputs, targets_BS=targets)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with autocast:
            out = theirs(input_ids=inputs, labels=tokens[:, :-1].clone())  # HF shifts labels itself
        out.loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    ours_t, theirs_t = [], []
    for _ in range(args.rounds):
        ours_t += time_steps(step_ours, args.steps, sync)
        theirs_t += time_steps(step_theirs, args.steps, sync)
    n_tokens = args.batch * args.seq
    ours_tps, theirs_tps = n_tokens / statistics.median(ours_t), n_tokens / statistics.median(theirs_t)
    import transformers

    print(f"shape: {args.preset} {cfg.n_layers}L d{cfg.d_model} h{cfg.n_heads}/kv{cfg.n_kv_heads} E{cfg.n_experts} top{cfg.top_k} "
          f"F{cfg.moe_ffn_dim} V{cfg.vocab_size}, batch {args.batch} x seq {args.seq}, {args.dtype}, {args.device}, "
          f"threads {torch.get_num_threads()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"gigafactory {args.preset}: {ours_tps:8.0f} tokens/s (median step {statistics.median(ours_t) * 1e3:.0f} ms)")
    print(f"HF MixtralForCausalLM: {theirs_tps:8.0f} tokens/s (median step {statistics.median(theirs_t) * 1e3:.0f} ms)")
    print(f"ratio ours/HF: {ours_tps / theirs_tps:.2f}x")


if __name__ == "__main__":
    main()
