"""Tool calls in OpenAI's shape: constrained to the function's parameters schema, streamed as tool-call deltas,
"auto" decided by the first character, tool turns accepted in the history, bad tool fields are 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from gigafactory.serve.protocol import ChatCompletionRequest
from gigafactory.serve.tools import ToolCallReader, call_text, template_messages, tool_mode
from tests.serve.structured_fixtures import random_model_server

@pytest.fixture(scope="module")
def random_server(loaded):
    with random_model_server(loaded.tokenizer) as url:
        yield url


WEATHER = {"type": "object", "required": ["city", "days"], "additionalProperties": False,
           "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer", "minimum": 1,
                                                                                   "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "now"}}]
SCHEMAS = {"get_weather": WEATHER, "now": {"type": "object", "maxProperties": 0}}
ASK = [{"role": "user", "content": "Weather in Rome?"}]


def _stream_pieces(reader: ToolCallReader, text: str, finish: str):
    """Feed `text` one character at a time; the deltas and the last finish reason."""
    deltas = [reader.feed(ch, None)[0] for ch in text[:-1]]
    last, reason = reader.feed(text[-1], finish)
    return [d for d in deltas + [last] if d], reason


def test_reader_streams_the_call_and_reads_it_whole():
    text = call_text("get_weather", '{"city": "Rome", "days": 2}')
    deltas, reason = _stream_pieces(ToolCallReader(["get_weather", "now"]), text, "stop")
    first = deltas[0]["tool_calls"][0]
    assert first["id"].startswith("call_") and first["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Rome", "days": 2}'
    assert reason == "tool_calls"
    message, reason = ToolCallReader(["get_weather"]).message(text, "stop")
    assert message["content"] is None and reason == "tool_calls"
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}
    assert ToolCallReader(["now"]).message("Hello {x}", "stop") == ({"role": "assistant", "content": "Hello {x}"}, "stop")
    cut, reason = ToolCallReader(["get_weather"]).message(text[:-8], "length")  # budget ran out inside the arguments
    assert reason == "length" and cut["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome", "da'
    assert ToolCallReader(["get_weather"]).message('{"name": "get_', "length")[0]["content"] == '{"name": "get_'


def test_history_with_tool_turns_renders_for_the_template():
    req = ChatCompletionRequest.model_validate({"tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
    mode, names = tool_mode(req)
    turns = template_messages(req, mode)
    assert (mode, names) == ("auto", ["get_weather", "now"]) and [t["role"] for t in turns] == [
        "system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in turns[0]["content"]
    assert turns[2]["content"] == call_text("get_weather", '{"city": "Rome"}')
    assert turns[3]["content"] == "Result of get_weather (call call_1): sunny"


def test_required_and_named_calls_validate_and_stream_the_same(random_server):
    client = openai.OpenAI(base_url=random_server + "/v1", api_key="unused", max_retries=0)
    seen = set()
    for seed in range(3):
        for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
            out = client.chat.completions.create(model="grok-tiny", messages=ASK, tools=TOOLS, tool_choice=choice,
                                                 seed=seed, temperature=1.0, max_tokens=120)
            c = out.choices[0]
            assert c.finish_reason == "tool_calls" and c.message.content is None, c
            call = c.message.tool_calls[0]
            assert call.type == "function" and (choice == "required" or call.function.name == "get_weather")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            seen.add(call.function.name)
    assert seen == {"get_weather", "now"}  # "required" let the model pick either
    stream = client.chat.completions.create(model="grok-tiny", messages=ASK, tools=TOOLS, seed=2, temperature=1.0,
                                            max_tokens=120, stream=True, tool_choice=choice)
    chunks = [c.choices[0] for c in stream if c.choices]
    parts = [d.function for c in chunks for d in c.delta.tool_calls or []]
    assert parts[0].name == "get_weather" and chunks[-1].finish_reason == "tool_calls"
    assert "".join(p.arguments or "" for p in parts) == call.function.arguments  # seed 2, named: the last one above


def test_auto_is_decided_by_the_first_character(random_server, loaded):
    brace = str(loaded.tokenizer.token_to_id("{"))
    client = openai.OpenAI(base_url=random_server + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="grok-tiny", messages=ASK, tools=TOOLS, seed=0, temperature=1.0, max_tokens=60)
    call = client.chat.completions.create(logit_bias={brace: 100}, **kw).choices[0]
    assert call.finish_reason == "tool_calls" and call.message.tool_calls[0].function.name in SCHEMAS
    text = client.chat.completions.create(logit_bias={brace: -100}, **kw).choices[0]
    assert text.message.tool_calls is None and text.message.content and not text.message.content.startswith("{")
    none = client.chat.completions.create(tool_choice="none", logit_bias={brace: 100}, **kw).choices[0]
    assert none.message.tool_calls is None and none.message.content.startswith("{")  # no grammar, no call


def test_a_conversation_with_tool_results_is_answered(random_server):
    client = openai.OpenAI(base_url=random_server + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="grok-tiny", tools=TOOLS, max_tokens=8, seed=1, messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD = [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tools": []}, "tools"),
    ({"tools": [TOOLS[1], TOOLS[1]]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}], "tool_choice": "required"},
     "tools.0.function.parameters"),
    # compiles inside the call grammar and failed only once decoding reached the arguments: a 500 mid-answer
    *(({"tools": [TOOLS[1], {"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
        "tool_choice": choice}, "tools.1.function.parameters") for choice in ("required", "auto")),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0"),
]


@pytest.mark.parametrize("extra,param", BAD)
def test_bad_tool_requests_are_400_naming_the_field(random_server, extra, param):
    r = httpx.post(random_server + "/v1/chat/completions", timeout=30, json={"messages": ASK, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
