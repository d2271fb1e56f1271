"""The engine: continuous batching gives the same tokens as single-request decoding; stops, limits, seeds."""

from __future__ import annotations

import threading

import pytest

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams
from gigafactory.serve.engine import Engine
from gigafactory.serve.sequence import Sequence

PROMPTS = ["In", "In the beginning God created", "And God said, Let there be light: and there was light.",
           "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures", "Jesus wept", "And"]


def run_all(engine: Engine, requests: list[dict]) -> list[Sequence]:
    done = threading.Semaphore(0)
    seqs = [engine.submit(on_event=lambda text, fin: fin and done.release(), **r) for r in requests]
    for _ in requests:
        assert done.acquire(timeout=60)
    return seqs


@pytest.mark.parametrize("n_slots", [1, 3, 8])
def test_batched_greedy_equals_single_request(loaded, n_slots):
    """Fewer slots than prompts forces requests to join and leave the running batch mid-flight."""
    tok = loaded.tokenizer
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (12, 20, 7, 16, 25, 3)]
    ids = [tok.encode(p).ids for p in PROMPTS]
    expected = [list(generate_tokens(loaded.model, i, p, stop_at_eos=False)) for i, p in zip(ids, params)]
    engine = Engine(loaded.model, tok, "t", n_slots=n_slots).start()
    try:
        seqs = run_all(engine, [dict(prompt_ids=i, params=p, ignore_eos=True) for i, p in zip(ids, params)])
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == expected
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.kv.n_free == n_slots  # every slot came back


def test_sampled_requests_match_single_request_with_the_same_seed(loaded):
    tok = loaded.tokenizer
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=15)
    ids = [tok.encode(s).ids for s in PROMPTS[:4]]
    expected = [list(generate_tokens(loaded.model, i, p, seed=7 + n, stop_at_eos=False)) for n, i in enumerate(ids)]
    engine = Engine(loaded.model, tok, "t", n_slots=4).start()
    try:
        seqs = run_all(engine, [dict(prompt_ids=i, params=p, seed=7 + n, ignore_eos=True) for n, i in enumerate(ids)])
    finally:
        engine.stop()
    assert [s.output_ids for s in seqs] == expected


def _seq(tok, stop, events):
    return Sequence([5], SamplingParams(temperature=0, max_tokens=100), tok, lambda t, f: events.append((t, f)), stop)


def test_stop_strings_are_held_back_and_cut(loaded):
    tok = loaded.tokenizer
    events: list = []
    seq = _seq(tok, ["light"], events)
    for t in tok.encode("Let there be light and more").ids:
        if seq.finish_reason:
            break
        seq.append(t, eos_id=2, max_len=64)
    text = "".join(t for t, _ in events)
    assert text == "Let there be " and seq.finish_reason == "stop" and events[-1][1] == "stop"
    events.clear()
    seq = _seq(tok, ["lightning"], events)  # a prefix of the stop string is held back, then released at the end
    for t in tok.encode("be light").ids:
        seq.append(t, eos_id=2, max_len=64)
    assert "".join(t for t, _ in events) == "be "
    seq.params.max_tokens = len(seq.output_ids) + 1
    seq.append(tok.encode("!").ids[0], eos_id=2, max_len=64)
    assert "".join(t for t, _ in events) == "be light!" and seq.finish_reason == "length"


def test_eos_and_context_end_a_request(loaded):
    tok = loaded.tokenizer
    events: list = []
    seq = _seq(tok, [], events)
    seq.append(2, eos_id=2, max_len=64)
    assert seq.finish_reason == "stop" and seq.output_ids == []
    events.clear()
    seq = Sequence([5] * 60, SamplingParams(temperature=0, max_tokens=100), tok, lambda t, f: events.append((t, f)))
    for _ in range(4):
        seq.append(70, eos_id=2, max_len=64)
    assert seq.finish_reason == "length" and len(seq.output_ids) == 4


def test_a_role_token_ends_a_chat_answer(loaded):
    """With role tokens, the model starting a new turn ends its answer (it must not write the user's turn)."""
    from gigafactory.serve.chat_template import ChatTemplate

    tok = loaded.tokenizer
    template = ChatTemplate(tok, tok)
    assert template.special
    events: list = []
    seq = Sequence([5], SamplingParams(temperature=0, max_tokens=100), tok, lambda t, f: events.append((t, f)),
                   stop_ids=frozenset(template.role_ids.values()))
    seq.append(tok.encode("Yes").ids[0], eos_id=2, max_len=64)
    seq.append(tok.token_to_id("<|user|>"), eos_id=2, max_len=64)
    assert seq.finish_reason == "stop" and len(seq.output_ids) == 1 and events[-1] == ("", "stop")
