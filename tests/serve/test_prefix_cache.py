"""Prefix caching and chunked prefill: prompts that share a start reuse its keys/values, long prompts are prefilled
a chunk per step while other requests keep decoding, and the tokens are exactly those of a plain full prefill."""

from __future__ import annotations

import threading

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.prefix_cache import BLOCK
from tests.serve.test_engine import PROMPTS, run_all

SYSTEM = "In the beginning God created the heaven and the earth. And the earth was without form, and void"


def test_shared_prefix_is_reused_and_tokens_equal_full_prefill(loaded):
    tok = loaded.tokenizer
    base = tok.encode(SYSTEM).ids
    assert len(base) >= 2 * BLOCK
    prompts = [base + tok.encode(s).ids for s in (" light", " And God said", " darkness", " the waters")]
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = [list(generate_tokens(loaded.model, p, params, stop_at_eos=False)) for p in prompts]
    metrics = Metrics()
    engine = Engine(loaded.model, tok, "t", n_slots=2, metrics=metrics).start()  # 2 rows: copies and reused rows
    try:
        seqs = run_all(engine, [dict(prompt_ids=p, params=params, ignore_eos=True) for p in prompts])
        # a later turn of a finished conversation: its prompt starts with an earlier prompt and its answer
        follow = prompts[0] + seqs[0].output_ids + tok.encode(" and").ids
        again = run_all(engine, [dict(prompt_ids=follow, params=params, ignore_eos=True)])
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == expected
    assert again[0].output_ids == list(generate_tokens(loaded.model, follow, params, stop_at_eos=False))
    assert any(s.copy_from is not None for s in seqs) and any(s.copy_from is None and s.cached_tokens for s in seqs)
    assert all(s.cached_tokens >= BLOCK for s in seqs[1:]) and again[0].cached_tokens >= len(prompts[0]) // BLOCK * BLOCK
    assert metrics.prefix_cached_tokens.get(model="t") == sum(s.cached_tokens for s in seqs + again)
    assert engine.kv.n_free == 2


def test_chunked_prefill_with_shared_prefixes_equals_full_prefill(loaded):
    """Chunks of 5 tokens; prompts sharing a start admitted in the same step borrow only the blocks already written."""
    tok = loaded.tokenizer
    base = tok.encode(SYSTEM).ids
    prompts = [tok.encode(p).ids for p in PROMPTS] + [base + tok.encode(s).ids for s in (" light", " waters", " void")]
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=1.0, top_k=20, max_tokens=6)]
    expected = [list(generate_tokens(loaded.model, p, params[i % 2], seed=i, stop_at_eos=False))
                for i, p in enumerate(prompts)]
    engine = Engine(loaded.model, tok, "t", n_slots=3, prefill_chunk=5).start()
    try:
        seqs = run_all(engine, [dict(prompt_ids=p, params=params[i % 2], seed=i, ignore_eos=True)
                                for i, p in enumerate(prompts)])
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == expected
    assert engine.kv.n_free == 3


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(loaded):
    """A's first token triggers B (a 50-token prompt, chunks of 5): A gets a token in each of B's 10 prefill steps."""
    tok = loaded.tokenizer
    long_prompt = tok.encode(SYSTEM + SYSTEM).ids[:50]
    engine = Engine(loaded.model, tok, "t", n_slots=2, prefill_chunk=5)
    seen: dict = {}
    finished = threading.Semaphore(0)

    def on_a(text, finish):
        if "b" not in seen and text:  # submitted from the engine thread: admitted at the very next step
            seen["b"] = engine.submit(long_prompt, SamplingParams(temperature=0, max_tokens=2), on_b, ignore_eos=True)
        if finish:
            finished.release()

    def on_b(text, finish):
        seen.setdefault("a_tokens_at_b_first", len(seen["a"].output_ids))
        if finish:
            finished.release()

    seen["a"] = engine.submit(tok.encode("In").ids, SamplingParams(temperature=0, max_tokens=40), on_a, ignore_eos=True)
    engine.start()
    try:
        assert finished.acquire(timeout=30) and finished.acquire(timeout=30)
    finally:
        engine.stop()
    assert seen["a_tokens_at_b_first"] >= 10 and len(seen["b"].output_ids) == 2
