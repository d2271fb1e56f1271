"""Paged KV cache: prompt chunks and decodes of several sequences in one forward, through scattered block tables,
give the logits of a plain forward; shared prefix blocks are computed once and change no token; a short pool makes
requests wait, never fail."""

from __future__ import annotations

import pytest
import torch

from gigafactory.errors import UserError
from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine
from gigafactory.serve.kv_cache import BLOCK_SIZE, PagedKVCache
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.model_runner import Chunk, ModelRunner
from gigafactory.serve.scheduler import Scheduler
from gigafactory.serve.sequence import Sequence
from tests.serve.test_engine import run_all


def _seq(tok, ids, table=(), max_tokens=8):
    seq = Sequence(list(ids), SamplingParams(temperature=0, max_tokens=max_tokens), tok, lambda text, fin: None)
    seq.block_table = list(table)
    return seq


def test_one_forward_of_chunks_and_decodes_equals_a_plain_forward(loaded):
    model, tok = loaded.model, loaded.tokenizer
    kv = PagedKVCache(model.cfg, n_slots=2, max_len=model.cfg.max_seq_len, device="cpu", n_blocks=10)
    runner = ModelRunner(model, kv)
    a = _seq(tok, tok.encode("In the beginning God created the heaven and the earth").ids, [7, 2, 9])
    b = _seq(tok, tok.encode("And God said, Let there be light: and there was light. And God saw").ids, [4, 0, 8, 1])
    assert len(b.prompt_ids) > BLOCK_SIZE + 2

    def plain(ids):  # no cache at all: the reference
        with torch.no_grad():
            return model(torch.tensor([ids]))[0, -1]

    # step 1: all of a's prompt and the first 10 tokens of b's (b samples nothing yet)
    out = runner.forward([Chunk(a, 0, len(a.prompt_ids)), Chunk(b, 0, 10)], [])
    assert [s for s, _ in out] == [a]
    torch.testing.assert_close(out[0][1], plain(a.prompt_ids), atol=1e-4, rtol=1e-4)
    a.output_ids.append(int(out[0][1].argmax()))
    # steps 2-4: a decodes while b's prompt finishes in the same forward, then both decode together
    out = {s.id: lg for s, lg in runner.forward([Chunk(b, 10, len(b.prompt_ids))], [a])}
    b.output_ids.append(int(out[b.id].argmax()))
    for _ in range(3):
        torch.testing.assert_close(out[a.id], plain(a.prompt_ids + a.output_ids), atol=1e-4, rtol=1e-4)
        a.output_ids.append(int(out[a.id].argmax()))
        out = {s.id: lg for s, lg in runner.forward([], [a, b])}
        torch.testing.assert_close(out[b.id], plain(b.prompt_ids + b.output_ids), atol=1e-4, rtol=1e-4)
        b.output_ids.append(int(out[b.id].argmax()))


def test_shared_system_prompt_is_computed_once_and_changes_no_token(loaded):
    """Five requests arrive together with one 32-token system prompt: the first computes it, the others wait a step
    and share its blocks; a pool of 5 blocks (the writer needs 3, each reader 1 more) makes the last ones wait."""
    tok = loaded.tokenizer
    system = (tok.encode("In the beginning God created the heaven and the earth. And the earth was").ids * 4)[:32]
    prompts = [system + tok.encode(s).ids for s in (" light", " And God", " darkness", " waters", " void")]
    params = SamplingParams(temperature=0, max_tokens=10)
    expected = [list(generate_tokens(loaded.model, p, params, stop_at_eos=False)) for p in prompts]
    metrics = Metrics()
    engine = Engine(loaded.model, tok, "t", n_slots=4, metrics=metrics, kv_blocks=5).start()
    try:
        seqs = run_all(engine, [dict(prompt_ids=p, params=params, ignore_eos=True) for p in prompts])
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == expected
    assert [s.cached_tokens for s in seqs] == [0] + [32] * 4
    assert metrics.prefix_cached_tokens.get(model="t") == 4 * 32
    assert engine.kv.blocks_in_use == 0 and engine.kv.n_free == 4
    assert metrics.kv_blocks.get(model="t") == 0


def test_a_prompt_waiting_for_an_aborted_writer_computes_the_prefix_itself(loaded):
    tok = loaded.tokenizer
    kv = PagedKVCache(loaded.model.cfg, n_slots=4, max_len=loaded.model.cfg.max_seq_len, device="cpu")
    scheduler = Scheduler(kv)
    shared = list(range(10, 10 + 2 * BLOCK_SIZE))
    writer, reader = _seq(tok, shared + [1, 2]), _seq(tok, shared + [3, 4])
    scheduler.add(writer)
    scheduler.add(reader)
    assert scheduler.admit() == [writer]  # the reader waits for the writer's blocks
    assert scheduler.admit() == []
    writer.abort()
    scheduler.retire()
    assert scheduler.admit() == [reader] and reader.cached_tokens == 0
    assert kv.blocks_in_use == len(reader.block_table)


def test_a_pool_smaller_than_one_context_is_refused(loaded):
    with pytest.raises(UserError, match="cannot hold one full context"):
        Engine(loaded.model, loaded.tokenizer, "t", kv_blocks=loaded.model.cfg.max_seq_len // BLOCK_SIZE - 1)
