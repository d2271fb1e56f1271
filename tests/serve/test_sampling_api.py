"""logprobs / top_logprobs, logit_bias, penalties and min_p over HTTP, checked with the official openai client."""

from __future__ import annotations

import httpx
import openai


def test_completion_logprobs_match_the_text(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="grok-tiny", prompt="And God said", max_tokens=8, temperature=0, logprobs=2,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == 8
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) == 2 for t in lp.top_logprobs)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):  # greedy: the sampled one is the best
        assert max(top.values()) == value and top.get(token) == value
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_streamed_chat_logprobs(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="grok-tiny", stream=True, max_tokens=6, temperature=0.8, seed=1,
                                            logprobs=True, top_logprobs=3,
                                            messages=[{"role": "user", "content": "Who made light?"}])
    text, entries = "", []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                entries += chunk.choices[0].logprobs.content
    assert entries and "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 and e.bytes for e in entries)


def test_logit_bias_penalties_and_min_p_are_honoured(server, loaded):
    url, _ = server
    token = loaded.tokenizer.encode(" light").ids[0]
    body = {"prompt": "In the beginning", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "logit_bias": {str(token): 100}}
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == loaded.tokenizer.decode([token] * 5)
    body = {"prompt": "In the beginning", "max_tokens": 5, "temperature": 0.7, "seed": 2, "presence_penalty": 1.5,
            "frequency_penalty": -0.5, "min_p": 0.1}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200


def test_n_choices_are_independent_seeded_samples(server):
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="grok-tiny", prompt="And God said", max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    out = client.completions.create(n=3, seed=10, **kw)
    assert [c.index for c in out.choices] == [0, 1, 2] and out.usage.completion_tokens == 18
    singles = [client.completions.create(n=1, seed=10 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in out.choices] == singles  # choice i is the request with seed + i

    stream = client.chat.completions.create(model="grok-tiny", stream=True, n=2, max_tokens=4, temperature=0.9, seed=1,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Who made light?"}])
    chunks = list(stream)
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert set(finishes) == {0, 1} and chunks[-1].usage.completion_tokens >= 2
