"""response_format enforced while decoding (llguidance): random logits and an untrained model still give JSON that
parses and validates; the budget running out first is finish_reason "length"; bad formats are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch

from gigafactory.data.tokenizer import EOS_ID
from gigafactory.inference.sampling import SamplingParams, sample_next
from gigafactory.serve.protocol import ResponseFormat
from gigafactory.serve.structured import response_format_constraint
from tests.serve.structured_fixtures import random_model_server

@pytest.fixture(scope="module")
def random_server(loaded):
    with random_model_server(loaded.tokenizer) as url:
        yield url


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "items": {"enum": ["admin", "user"]}, "maxItems": 3},
                         "address": {"type": "object", "required": ["zip"], "additionalProperties": False,
                                     "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def _sample(tokenizer, params: SamplingParams, seed: int, limit: int = 300) -> tuple[str, bool]:
    """Sample from random logits until [EOS] or `limit` tokens: (text, ended with [EOS])."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(limit):
        token = sample_next(torch.randn(tokenizer.get_vocab_size() + 3, generator=gen) * 3, params, gen, out)
        if token == EOS_ID:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


def test_random_logits_under_the_constraint_always_validate(loaded):
    tok = loaded.tokenizer
    fmt = ResponseFormat.model_validate(FORMAT)
    for seed in range(4):
        text, ended = _sample(tok, SamplingParams(temperature=1.0, constraint=response_format_constraint(tok, fmt)), seed)
        assert ended, text
        jsonschema.validate(json.loads(text), PERSON)
        text, _ = _sample(tok, SamplingParams(temperature=1.0), seed, limit=40)  # the same draws, unconstrained
        with pytest.raises(ValueError):
            json.loads(text)


def test_a_constrained_greedy_request_skips_the_batch_argmax(loaded):
    tok = loaded.tokenizer
    params = SamplingParams(temperature=0, constraint=response_format_constraint(
        tok, ResponseFormat(type="json_object")))
    assert not params.plain_greedy
    logits = torch.zeros(tok.get_vocab_size())
    logits[tok.token_to_id("a")] = 10.0  # the argmax, but a JSON object cannot start with it
    assert tok.decode([sample_next(logits, params, None, [])]).startswith("{")


def test_openai_client_gets_valid_json_n_choices_and_streams(random_server):
    client = openai.OpenAI(base_url=random_server + "/v1", api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "Who are you?"}]
    out = client.chat.completions.create(model="grok-tiny", messages=msgs, n=3, seed=5, temperature=1.0,
                                         max_tokens=200, response_format=FORMAT)
    texts = [c.message.content for c in out.choices]
    assert [c.finish_reason for c in out.choices] == ["stop"] * 3 and len(set(texts)) == 3
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    stream = client.chat.completions.create(model="grok-tiny", messages=msgs, seed=5, temperature=1.0,
                                            max_tokens=200, response_format=FORMAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == texts[0]  # seed 5 = choice 0
    # A random model closes an object early or wanders past the budget, seed by seed: every one that ends is a dict.
    anything = [client.completions.create(model="grok-tiny", prompt="Hello", max_tokens=120, temperature=0.7, seed=seed,
                                          extra_body={"response_format": {"type": "json_object"}}) for seed in range(6)]
    ended = [a.choices[0].text for a in anything if a.choices[0].finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)


def test_budget_running_out_first_is_length(random_server):
    client = openai.OpenAI(base_url=random_server + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="grok-tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, response_format=FORMAT)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 4


BAD = [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    # compiles, but fails at its first token (was a 500 "generation failed" from inside the engine)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}},
     "response_format.json_schema.schema"),
    # a loop below the first token: it failed only when decoding reached property a
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
        "$defs": {"x": {"anyOf": [{"$ref": "#/$defs/x"}]}}}}}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_response_formats_are_400_naming_the_field(random_server, extra, param):
    r = httpx.post(random_server + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "hi"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and "\n" not in err["message"], err


def test_a_schema_too_deep_for_python_is_400_not_a_crash():
    """The HTTP body's depth check stops this first; the compiler must not depend on it."""
    from gigafactory.serve.protocol import ApiError
    from gigafactory.serve.structured import json_schema_grammar

    schema: dict = {"type": "string"}
    for _ in range(1500):  # past Python's default recursion limit of 1000
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(ApiError, match="nested too deeply"):
        json_schema_grammar(schema, "p")


def test_recursion_through_an_object_or_array_is_no_loop():
    from gigafactory.serve.structured import ref_loop

    tree = {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}},
            "$ref": "#/$defs/n"}
    assert ref_loop(tree) == "" and ref_loop({"type": "object", "properties": {"next": {"$ref": "#"}}}) == ""
    assert ref_loop({"$defs": {"x": {"allOf": [{"$ref": "#/$defs/y"}]}, "y": {"$ref": "#/$defs/x"}}}) in ("#/$defs/x", "#/$defs/y")
