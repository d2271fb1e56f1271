"""One request's failure never touches another's: a client leaving in prefill, a tiny temperature, a broken request."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import torch

from gigafactory.inference.generate import generate_tokens
from gigafactory.inference.sampling import SamplingParams, sample_next
from gigafactory.serve.engine import Engine
from tests.serve.conftest import make_state, running_server


def test_client_disconnecting_in_prefill_touches_no_other_stream(loaded):
    """Streams are decoding when one more client arrives and leaves during its own prefill: all 20 complete."""
    state = make_state(loaded, n_slots=24)
    engine = state.engines["grok-tiny"]
    prefill, decode, in_prefill, others = engine.runner.prefill, engine.runner.decode, threading.Event(), []

    def prefill_until_aborted(seq, *args):  # hold the leaving client's prefill until the server has noticed it left
        if seq.params.max_tokens == 7:
            others.append(engine.n_running - 1)  # requests in flight beside it
            in_prefill.set()
            deadline = time.monotonic() + 10
            while seq.finish_reason is None and time.monotonic() < deadline:
                time.sleep(0.01)
        return prefill(seq, *args)

    engine.runner.prefill = prefill_until_aborted
    engine.runner.decode = lambda seqs: time.sleep(0.02) or decode(seqs)  # the 20 are still decoding meanwhile
    with running_server(state) as url:
        port = int(url.rsplit(":", 1)[1])

        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=25)) as client:
                async def stream(i):
                    req = {"prompt": f"And {i}", "max_tokens": 50, "stream": True, "ignore_eos": True, "temperature": 0}
                    async with client.stream("POST", "/v1/completions", json=req) as r:
                        return r.status_code, [line async for line in r.aiter_lines() if line]
                tasks = [asyncio.create_task(stream(i)) for i in range(20)]
                deadline = time.monotonic() + 20
                while engine.n_running < 4:  # some are decoding (others may still be arriving)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                body = json.dumps({"prompt": "In", "max_tokens": 7}).encode()
                leaving = socket.create_connection(("127.0.0.1", port))
                leaving.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                while not in_prefill.is_set():
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                leaving.close()  # the client goes away in the middle of its prefill
                return await asyncio.gather(*tasks)

        results = asyncio.run(asyncio.wait_for(main(), 60))
    for status, lines in results:
        assert status == 200 and lines[-1] == "data: [DONE]", lines
        assert not any('"error"' in line for line in lines), lines
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert engine.kv.n_free == engine.kv.n_slots and others[0] >= 4


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([1.0, 3.0, 3.0 - 1e-6, -5.0])
    for t in (1e-300, 5e-324, 1e-30):
        assert sample_next(logits, SamplingParams(temperature=t), torch.Generator().manual_seed(0)) == 1


def test_tiny_temperature_over_http_beside_other_requests(server):
    url, _ = server

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async def one(temperature):
                r = await client.post("/v1/completions", json={"prompt": "And God said", "max_tokens": 6,
                                                               "temperature": temperature, "ignore_eos": True})
                return r.status_code, r.json()
            return await asyncio.gather(one(1e-300), *(one(0.8) for _ in range(5)), one(0))

    results = asyncio.run(main())
    assert [status for status, _ in results] == [200] * 7, results
    assert results[0][1]["choices"][0]["text"] == results[-1][1]["choices"][0]["text"]  # 1e-300 is greedy


def test_a_failing_request_ends_alone(loaded):
    """Sampling that raises for one request, or its callback raising, fails that request only."""
    engine = Engine(loaded.model, loaded.tokenizer, "t", n_slots=4)
    sample = engine.runner.sample
    engine.runner.sample = lambda seq, *a: (_ for _ in ()).throw(ValueError("boom")) if seq.params.max_tokens == 9 \
        else sample(seq, *a)
    events: dict[int, list] = {}
    done = threading.Semaphore(0)

    def callback(n, explode=False):
        def on_event(text, finish):
            events.setdefault(n, []).append((text, finish))
            if explode:
                raise RuntimeError("client callback broke")
            if finish:
                done.release()
        return on_event

    engine.start()
    try:
        ids = loaded.tokenizer.encode("In the beginning").ids
        seqs = [engine.submit(ids, SamplingParams(temperature=0, max_tokens=9 if n == 2 else 6), callback(n, n == 4),
                              ignore_eos=True) for n in range(6)]
        for _ in range(5):
            assert done.acquire(timeout=30)
        deadline = time.monotonic() + 10
        while engine.n_running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        engine.stop()
    assert [s.finish_reason for s in seqs] == ["length", "length", "error", "length", "error", "length"]
    assert events[2][-1] == ("generation failed: ValueError", "error")
    assert all(len(s.output_ids) == 6 for n, s in enumerate(seqs) if n not in (2, 4))
    assert engine.kv.n_free == 4


def test_a_failing_batched_decode_is_retried_row_by_row(loaded):
    """The batched forward raises (say, one row's numbers break it): each row is decoded alone and only the row that
    still fails ends with an error; the others finish with the same tokens as ever."""
    tok = loaded.tokenizer
    engine = Engine(loaded.model, tok, "t", n_slots=4)
    decode_one = engine.runner.decode_one

    def broken_batch(seqs):
        raise RuntimeError("batched forward failed")

    def one(seq):
        if seq.params.max_tokens == 9:
            raise RuntimeError("this row is the culprit")
        return decode_one(seq)

    engine.runner.decode, engine.runner.decode_one = broken_batch, one
    ids = tok.encode("In the beginning").ids
    params = [SamplingParams(temperature=0, max_tokens=9 if n == 1 else 6) for n in range(3)]
    done = threading.Semaphore(0)
    engine.start()
    try:
        seqs = [engine.submit(ids, p, lambda text, fin: fin and done.release(), ignore_eos=True) for p in params]
        for _ in seqs:
            assert done.acquire(timeout=30)
    finally:
        engine.stop()
    expected = list(generate_tokens(loaded.model, ids, SamplingParams(temperature=0, max_tokens=6), stop_at_eos=False))
    assert [s.finish_reason for s in seqs] == ["length", "error", "length"]
    assert seqs[0].output_ids == seqs[2].output_ids == expected
