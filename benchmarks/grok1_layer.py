"""One Grok-1 layer at its real shapes, forward + backward: tokens/s, TFLOP/s, MFU and peak memory, bf16 vs float8.

The numbers the planner's efficiencies should come from (issue 16): d_model 6144, 48 query / 8 KV heads of 128,
8 experts x 32768, top-2, attention cap 30, with a small vocabulary so that the embedding and head are negligible.
One layer in bf16 is ~4.9B parameters (9.7 GB of weights + 9.7 GB of gradients); no optimizer runs.

    python benchmarks/grok1_layer.py --device cuda --gpu h200              # bf16 and fp8, 1 x 4096 tokens
    python benchmarks/grok1_layer.py --device cpu --scale 48 --seq 256     # a scaled-down smoke run on a CPU

MFU counts the model FLOPs of gigafactory.models.flops (6 x active matmul parameters + attention without causal
halving, as PaLM) against the catalog's dense bf16 peak for both precisions, so fp8's MFU shows its gain over bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from gigafactory.models import GrokModel, get_preset
from gigafactory.models.flops import training_flops_per_token
from gigafactory.models.float8 import convert_to_float8
from gigafactory.plan.hardware import load_catalog


def _round(width: int, multiple: int = 64) -> int:
    return max(multiple, width // multiple * multiple)


def layer_config(scale: int, vocab: int):
    grok1 = get_preset("grok-1")
    return dataclasses.replace(
        grok1, n_layers=1, vocab_size=vocab, d_model=_round(grok1.d_model // scale), moe_ffn_dim=_round(grok1.moe_ffn_dim // scale),
        n_heads=max(grok1.n_heads // scale, grok1.n_kv_heads), head_dim=grok1.head_dim,
    )


def run(cfg, precision: str, device: torch.device, batch: int, seq: int, steps: int, warmup: int) -> dict:
    with torch.device("meta"):
        model = GrokModel(cfg)
    if precision == "fp8":
        print("  " + convert_to_float8(model).summary())
    model.to_empty(device=device)
    model.init_weights(0)
    model.to(torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        sync()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    flops = training_flops_per_token(cfg, seq) * batch * seq
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model
    return {"precision": precision, "step_s": step_s, "tokens_per_s": batch * seq / step_s, "tflops": flops / step_s / 1e12,
            "peak_gib": peak_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu", default="h100", help="Catalog GPU whose bf16 peak is the MFU denominator.")
    parser.add_argument("--precision", default="bf16,fp8", help="Comma-separated: bf16, fp8.")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--scale", type=int, default=1, help="Divide d_model and the expert width by this (CPU smoke runs).")
    parser.add_argument("--vocab", type=int, default=2048)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = layer_config(args.scale, args.vocab)
    peak = load_catalog().gpus[args.gpu].bf16_tflops
    print(f"grok-1 layer x1: d_model {cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads}x{cfg.head_dim}, "
          f"{cfg.n_experts} experts x {cfg.moe_ffn_dim}, top-{cfg.top_k}; {args.batch} x {args.seq} tokens; "
          f"MFU against {args.gpu} bf16 peak {peak:.0f} TFLOP/s")
    results = []
    for precision in args.precision.split(","):
        r = run(cfg, precision, device, args.batch, args.seq, args.steps, args.warmup)
        results.append(r)
        print(f"  {precision:5s} step {r['step_s'] * 1e3:8.1f} ms  tokens/s {r['tokens_per_s']:9,.0f}  "
              f"{r['tflops']:6.1f} TFLOP/s  MFU {r['tflops'] / peak:6.1%}  peak memory {r['peak_gib']:.1f} GiB")
    if len(results) == 2:
        print(f"  ratio {results[1]['precision']}/{results[0]['precision']} tokens/s: {results[1]['tokens_per_s'] / results[0]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
