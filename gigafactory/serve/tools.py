"""Tool calls in OpenAI's shape: the tools in the prompt, a grammar for the call, and the call read back from the text.

The model writes a call as one compact JSON object, `{"name": "get_weather", "arguments": {"city": "Paris"}}`, the
same text an assistant turn with `tool_calls` is rendered as in the history, so a model fine-tuned on its own
transcripts learns one format. `tool_choice`:
- "none": no tools in the prompt, no grammar: plain text.
- "required" / a named function: decoding is constrained to a call of one of the tools (or the named one), whose
  `arguments` match that function's `parameters` schema.
- "auto" (the default with tools): the model's first character decides. `{` commits it to a call, which the grammar
  then keeps valid; any other first character is a text answer, left unconstrained after it.
"""

from __future__ import annotations

import json
import uuid
from functools import lru_cache

from tokenizers import Tokenizer

from gigafactory.serve.protocol import ApiError, ChatCompletionRequest, ChatMessage
from gigafactory.serve.structured import JSON_LAYOUT, GrammarConstraint, compile_grammar, json_schema_grammar

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


def call_prefix(name: str) -> str:
    """The text a call to `name` starts with, up to its arguments (the grammar's fixed compact layout)."""
    return '{"name": ' + json.dumps(name) + ', "arguments": '


def call_text(name: str, arguments: str) -> str:
    return call_prefix(name) + arguments + "}"


def tool_mode(req: ChatCompletionRequest) -> tuple[str, list[str]]:
    """("none" | "auto" | "required", the function names the answer may call); a 400 for a choice that cannot hold."""
    choice = req.tool_choice
    if choice is not None and not req.tools:
        raise ApiError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice",
                       code="invalid_value")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) != len(names):
        raise ApiError(400, "two tools have the same function name", param="tools", code="invalid_value")
    for i, tool in enumerate(req.tools or []):
        if (tool.function.parameters or {}).get("type", "object") != "object":
            raise ApiError(400, "a function's 'parameters' must be a JSON schema of type object (its arguments)",
                           param=f"tools.{i}.function.parameters", code="invalid_value")
    if not req.tools or choice == "none":
        return "none", []
    if req.ignore_eos:
        raise ApiError(400, "'ignore_eos' cannot be combined with tools: a call ends where its grammar does",
                       param="ignore_eos", code="invalid_value")
    if req.response_format is not None and req.response_format.type != "text":
        raise ApiError(400, "'response_format' applies to text answers; use it with tool_choice 'none' or without "
                            "tools", param="response_format", code="invalid_value")
    if choice is None or choice == "auto":
        return "auto", names
    if choice == "required":
        return "required", names
    if choice.function.name not in names:
        raise ApiError(400, f"tool_choice names function '{choice.function.name}', which is not in 'tools'",
                       param="tool_choice", code="invalid_value")
    return "required", [choice.function.name]


def tool_constraint(tokenizer: Tokenizer, req: ChatCompletionRequest, mode: str, names: list[str]) -> GrammarConstraint:
    """The grammar of an answer under this tool mode: a call of one of `names` (required), or a call or any text
    not starting with "{" (auto)."""
    params = {t.function.name: t.function.parameters or NO_ARGUMENTS for t in req.tools or []}
    for i, tool in enumerate(req.tools or []):
        name = tool.function.name
        why = _arguments_flaw(tokenizer, json.dumps(params[name], sort_keys=True)) if name in names else ""
        if why:
            raise ApiError(400, f"tool '{name}': its 'parameters' {why}", param=f"tools.{i}.function.parameters",
                           code="invalid_value")
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": params[n]},
              "required": ["name", "arguments"], "additionalProperties": False} for n in names]
    schema = {"anyOf": calls, "x-guidance": JSON_LAYOUT} if len(calls) > 1 else {**calls[0], "x-guidance": JSON_LAYOUT}
    if mode == "required":
        return compile_grammar(tokenizer, json_schema_grammar(schema, "tools"), "tools")
    json_schema_grammar(schema, "tools")  # the size check, and a clear error for a schema that is not JSON
    lark = f"start: call | text\ncall: %json {json.dumps(schema)}\ntext: /[^{{][\\s\\S]*/\n"
    return compile_grammar(tokenizer, lark, "tools")


@lru_cache(maxsize=1024)
def _arguments_flaw(tokenizer: Tokenizer, schema_json: str) -> str:
    """'' when a function's `parameters` can be enforced on its own, else why not. Some schemas compile and fail only
    when decoding reaches them (`{"$ref": "#"}`: a 500 mid-answer); compiled alone, they fail at their first token.
    Cached (about a millisecond each): clients send the same tools with every request."""
    try:
        compile_grammar(tokenizer, json_schema_grammar(json.loads(schema_json), "parameters"), "parameters")
    except ApiError as err:
        return err.message.removeprefix("'parameters' ")
    return ""


def tools_prompt(req: ChatCompletionRequest) -> str:
    specs = [{"name": t.function.name, "description": t.function.description or "",
              "parameters": t.function.parameters or NO_ARGUMENTS} for t in req.tools or []]
    return ("You can call these functions. To call one, answer with only a JSON object "
            '{"name": <function name>, "arguments": <arguments object>}.\n'
            + "\n".join(json.dumps(s) for s in specs))


def template_messages(req: ChatCompletionRequest, mode: str) -> list[dict]:
    """The history as the chat template's {role, content} turns. The template knows system, user and assistant:
    an assistant's tool calls become the call text it would have written, and a tool's result a user turn that
    says which call it answers; the tools themselves join the system prompt."""
    calls_by_id = {c.id: c.function.name for m in req.messages for c in m.tool_calls or []}
    turns = [_turn(m, calls_by_id) for m in req.messages]
    if mode != "none":
        prompt = tools_prompt(req)
        if turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": turns[0]["content"] + "\n\n" + prompt}
        else:
            turns.insert(0, {"role": "system", "content": prompt})
    return turns


def _turn(m: ChatMessage, calls_by_id: dict[str, str]) -> dict:
    if m.role == "tool":
        name = calls_by_id.get(m.tool_call_id, "a function")
        return {"role": "user", "content": f"Result of {name} (call {m.tool_call_id}): {m.text()}"}
    text = m.text()
    if m.tool_calls:
        text = "\n".join([text] * bool(text) + [call_text(c.function.name, c.function.arguments) for c in m.tool_calls])
    return {"role": m.template_role(), "content": text}


class ToolCallReader:
    """Reads one choice's text as it streams: a text answer, or a call whose name and arguments it emits as soon as
    they are known (the arguments one character behind, since the last one may be the call's closing brace)."""

    def __init__(self, names: list[str]):
        self.prefixes = {n: call_prefix(n) for n in names}
        self.text = ""
        self.kind: str | None = None  # "text" | "call", once the first character is known
        self.name: str | None = None
        self.id = "call_" + uuid.uuid4().hex[:24]
        self.args_sent = 0

    def feed(self, piece: str, finish: str | None) -> tuple[dict, str | None]:
        """(the delta for this piece, the finish reason to report): `{"content": ...}` for text, `{"tool_calls":
        [...]}` for a call (the first carries id and name), and "tool_calls" for a call that completed."""
        self.text += piece
        if self.kind is None and self.text:
            self.kind = "call" if self.text.startswith("{") else "text"
        if self.kind == "text":
            return ({"content": piece} if piece else {}), finish
        if self.name is None:
            self.name = next((n for n, p in self.prefixes.items() if self.text.startswith(p)), None)
            if self.name is None:  # the name is not complete yet (or the output was cut inside it)
                return ({"content": self.text} if finish and self.text else {}), finish
            entry = {"index": 0, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}
        else:
            entry = {"index": 0, "function": {"arguments": ""}}
        complete = finish is not None and self._complete()
        args = self.text[len(self.prefixes[self.name]):]
        upto = len(args) - 1 if complete or finish is None else len(args)  # hold back what may be the closing brace
        upto = max(upto, self.args_sent)
        entry["function"]["arguments"], self.args_sent = args[self.args_sent:upto], upto
        has_news = "id" in entry or entry["function"]["arguments"]
        return ({"tool_calls": [entry]} if has_news else {}), ("tool_calls" if complete else finish)

    def message(self, text: str, finish: str | None) -> tuple[dict, str | None]:
        """The whole answer as OpenAI's message and finish reason."""
        self.feed(text, finish)
        if self.kind != "call" or self.name is None:
            return {"role": "assistant", "content": self.text}, finish
        args = self.text[len(self.prefixes[self.name]):]
        complete = self._complete()
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": args[:-1] if complete else args}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls" if complete else finish

    def _complete(self) -> bool:
        try:
            return isinstance(json.loads(self.text), dict)
        except ValueError:
            return False
