"""What only a CUDA GPU can check: grouped-GEMM experts, fused capped attention, the chunked head loss (an experiment:
the model uses it on CPUs only), cached decoding, the bf16 peak.

Each check compares the CUDA path against a float64 reference by ||out - ref|| / ||ref|| on fresh random inputs, and
times with CUDA events (median of repeats after warm-up). Called by benchmarks/gpu.sh; prints one line per result.

    python3 benchmarks/gpu_checks.py
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.models import GrokModel, get_preset
from gigafactory.models.grok.head_loss import head_cross_entropy
from gigafactory.models.grok.moe import Experts, _grouped_mm_ok, per_expert_ffn


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def cuda_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak() -> None:
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_ms(lambda: a @ b)
    print(f"bf16 matmul {n}^3: {2 * n**3 / ms / 1e9:.0f} TFLOP/s")


def experts_check() -> None:
    """grok-1b-moe expert shapes, 8192 tokens routed unevenly (one expert empty): grouped vs per-expert float64."""
    cfg = get_preset("grok-1b-moe")
    experts = Experts(cfg).cuda()
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.02)
    counts = torch.tensor([2048, 1500, 0, 1024, 700, 1900, 520, 500], device="cuda")
    x = torch.randn(int(counts.sum()), cfg.d_model, device="cuda", requires_grad=True)
    print(f"F.grouped_mm available: {hasattr(torch.nn.functional, 'grouped_mm')}, "
          f"used for bf16 here: {_grouped_mm_ok(x.bfloat16())}")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = experts(x, counts)
    grad_out = torch.randn_like(out, dtype=torch.float32)
    out.float().backward(grad_out)
    fast = (out.float(), x.grad.clone(), experts.w_gate.grad.clone())

    x_ref = x.detach().double().requires_grad_()
    ref_experts = Experts(cfg).cuda().double()
    ref_experts.load_state_dict({k: v.double() for k, v in experts.state_dict().items()})
    ref_experts.forward = lambda x_, c: _per_expert(ref_experts, x_, c)
    ref = ref_experts(x_ref, counts)
    ref.backward(grad_out.double())
    errs = [rel_err(a, b) for a, b in zip(fast, (ref, x_ref.grad, ref_experts.w_gate.grad))]
    print(f"experts bf16 vs float64: out {errs[0]:.1e}, dx {errs[1]:.1e}, dW_gate {errs[2]:.1e} "
          f"({'OK' if max(errs) < 2e-2 else 'FAIL'}: bf16 operands should land between 1e-3 and 1e-2)")

    xb = x.detach().bfloat16()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        grouped = cuda_ms(lambda: experts(xb, counts))
        loop = cuda_ms(lambda: _per_expert(experts, xb, counts))
    print(f"experts forward, 8192 tokens: grouped {grouped:.2f} ms, per-expert loop {loop:.2f} ms ({loop / grouped:.1f}x)")


def _per_expert(experts: Experts, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The per-expert loop (the grouped GEMMs' fallback), weights in x's dtype."""
    weights = (w.to(x.dtype) for w in (experts.w_gate, experts.w_up, experts.w_down))
    return per_expert_ffn(x, counts, *weights, experts.act)


def attention_check() -> None:
    """grok-1b-moe with 4 layers: fused FlexAttention (auto on CUDA) vs materialised logits; loss, grads, speed, memory."""
    cfg = dataclasses.replace(get_preset("grok-1b-moe"), n_layers=4, aux_loss_weight=0.0)
    models = {}
    for impl in ("eager", "flex"):
        torch.manual_seed(0)
        models[impl] = GrokModel(dataclasses.replace(cfg, attn_impl=impl)).cuda()
        models[impl].init_weights(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 1024), device="cuda")
    grads = {}
    for impl, model in models.items():
        model(tokens).float().logsumexp(-1).mean().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    with torch.no_grad():
        err = rel_err(models["flex"](tokens), models["eager"](tokens))
    print(f"attention flex vs eager, fp32: logits {err:.1e}, grads {rel_err(grads['flex'], grads['eager']):.1e} "
          f"({'OK' if err < 1e-3 else 'FAIL'})")

    tokens = torch.randint(0, cfg.vocab_size, (4, 4096), device="cuda")
    for impl, model in models.items():
        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                model(tokens).float().logsumexp(-1).mean().backward()
        try:
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_ms(step, repeats=5, warmup=2)
            print(f"attention {impl}: 4 layers fwd+bwd, 4 x 4096 tokens, bf16: {ms:.1f} ms, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        except torch.OutOfMemoryError:
            print(f"attention {impl}: out of memory at 4 x 4096 tokens")
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def head_loss_check() -> None:
    """Grok-1's head (vocab 131072, d_model 6144), one 8192-token sequence, bf16: fused chunked loss vs F.cross_entropy
    on whole logits, against a float64 reference; then time and peak memory of each (forward + backward)."""
    T, D, V, mult = 8192, 6144, 131072, 0.5773502691896257
    h = (torch.randn(T, D, device="cuda") * 0.5).requires_grad_()
    w = (torch.randn(V, D, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, V, (T,), device="cuda")

    def plain():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(h * mult, w)
        return torch.nn.functional.cross_entropy(logits.float(), targets)

    def fused():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return head_cross_entropy(h, w, targets, mult)

    n = 1024  # float64 reference on a slice (whole would not fit)
    h64, w64 = h[:n].detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy((h64 * mult) @ w64.t(), targets[:n])
    ref.backward()
    h_n = h[:n].detach().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = head_cross_entropy(h_n, w, targets[:n], mult)
    w.grad = None
    loss.backward()
    errs = (rel_err(loss, ref), rel_err(h_n.grad, h64.grad), rel_err(w.grad, w64.grad))
    print(f"fused head loss bf16 vs float64 (1024 tokens): loss {errs[0]:.1e}, dh {errs[1]:.1e}, dW {errs[2]:.1e} "
          f"({'OK' if max(errs) < 2e-2 else 'FAIL'})")
    for name, fn in (("whole logits", plain), ("fused chunked", fused)):
        h.grad = w.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            ms = cuda_ms(lambda: fn().backward(), repeats=5, warmup=1)
            print(f"head + loss, {T} tokens x vocab {V}, {name}: {ms:.1f} ms, "
                  f"peak {(torch.cuda.max_memory_allocated() - base) / 2**30:.1f} GiB above inputs")
        except torch.OutOfMemoryError:
            print(f"head + loss, {name}: out of memory")


def cached_decoding_check() -> None:
    cfg = get_preset("grok-tiny")
    model = GrokModel(cfg).cuda().eval()
    model.init_weights(0)
    prompt = torch.randint(3, cfg.vocab_size, (12,)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=48)
    cached = list(generate_tokens(model, prompt, params, stop_at_eos=False))
    plain = list(generate_tokens(model, prompt, params, use_cache=False, stop_at_eos=False))
    print(f"KV-cached vs uncached greedy decoding on CUDA: {sum(a == b for a, b in zip(cached, plain))}/{len(plain)} "
          f"tokens equal ({'OK' if cached == plain else 'FAIL'})")


def main() -> None:
    props = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.get_device_name(0)}, {props.multi_processor_count} SMs, torch {torch.__version__}")
    for check in (matmul_peak, experts_check, attention_check, head_loss_check, cached_decoding_check):
        try:
            check()
        except Exception as error:  # report and go on: one failed check must not hide the others
            print(f"{check.__name__}: FAILED with {type(error).__name__}: {str(error)[:300]}")
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
