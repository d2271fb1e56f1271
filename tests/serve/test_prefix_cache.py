"""Prefix caching: prompts that share a start reuse its keys/values, and the tokens are exactly those of a full prefill."""

from __future__ import annotations

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.prefix_cache import BLOCK
from tests.serve.test_engine import run_all

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
