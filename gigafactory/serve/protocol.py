"""OpenAI request schemas (exactly the fields we honour, with OpenAI's ranges), body checks, and error bodies.

An OpenAI field this server does not honour is refused with a 400 naming it, never silently ignored: a client that
sends `best_of` or `suffix` must learn that its output will not follow them.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gigafactory.serve.sequence import MAX_STOP_CHARS

MAX_JSON_DEPTH = 32  # deeper bodies are refused before validation (json.loads recurses; 1000 levels raise)
MAX_LOGIT_BIAS = 300  # OpenAI's own bound on logit_bias entries
MAX_N = 16  # choices per request

MAX_TOOLS = 128  # OpenAI's own bound on `tools`
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: FunctionName
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # None: any JSON value
    strict: bool | None = None  # the schema is always enforced exactly, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is required with type json_schema and allowed only with it")
        return self


class _Request(BaseModel):
    # Unknown fields are refused (see validation_error); NaN/Infinity (json.loads accepts them) are not numbers.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # extension (vLLM-style); 0 = off
    min_p: float = Field(0.0, ge=0, le=1)  # extension (vLLM-style); 0 = off
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    n: int = Field(1, ge=1, le=MAX_N)  # choices: n sequences, seeds seed, seed+1, ...
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    seed: int | None = None
    user: str | None = None  # the end user's id (OpenAI: for abuse monitoring); logged nowhere, changes nothing
    ignore_eos: bool = False  # extension: keep generating past [EOS]
    response_format: ResponseFormat | None = None  # enforced while decoding (serve/structured.py)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def bias_ids(self, vocab_size: int) -> dict[int, float]:
        """logit_bias with its keys as token ids; a key that is not an id in the vocabulary is an ApiError."""
        out = {}
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 9 and int(key) < vocab_size):
                raise ApiError(400, f"logit_bias key {key[:20]!r} is not a token id in [0, {vocab_size})",
                               param="logit_bias", code="invalid_value")
            out[int(key)] = bias
        return out


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    max_tokens: int | None = 16
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the sampled token's logprob plus this many top ones

    def top_logprobs_k(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # assistant turns only
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)  # tool turns only: the call answered

    @model_validator(mode="after")
    def _shape_fits_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry 'tool_calls'")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("'tool_call_id' is required on tool messages and allowed only there")
        if self.content is None and self.tool_calls is None:
            raise ValueError("'content' is required (it may be null only on an assistant message with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role  # OpenAI's newer name for the system turn


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName
    description: str | None = None
    parameters: dict | None = None  # a JSON schema for the arguments object; None: no arguments
    strict: bool | None = None  # the schema is always enforced exactly, strict or not


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool | None = None  # accepted either way: an answer holds at most one call (valid for both)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_k(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class ApiError(Exception):
    """Raised anywhere in a handler; becomes an OpenAI-style error response."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "api_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(err) -> ApiError:
    """One pydantic error as an OpenAI-style 400 that names the field and what it must be. For a union (`stop` is a
    string or a list of strings) the deepest error is the telling one, and the union's branch names leave the path."""
    errors = err.errors()
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # max() keeps the first of equals
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _branch(p)]
    param = ".".join(loc) or None
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"'{param}' is not supported by this server; remove it (see docs/serve.md for the "
                             f"fields it honours)", param=param, code="unsupported_parameter")
    msg = first.get("msg", "invalid request")
    return ApiError(400, f"invalid value for '{param}': {msg}" if param else msg, param=param, code="invalid_value")


def _branch(part) -> bool:
    """A union branch's name in a pydantic error path ("str", "list[TextPart]", "constrained-str"), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part)


def parse_body(body: bytes) -> dict:
    """The request body as a JSON object, or an ApiError: not JSON, too deep, a number too long for Python's int
    parser, or text that is not valid Unicode (a lone surrogate like "\\ud800" cannot be tokenized or echoed)."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:  # JSONDecodeError, > 4300 digits, depth
        reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)[:200]
        raise ApiError(400, f"request body is not valid JSON ({reason}); send a JSON object", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    stack = [(raw, 1, "")]
    while stack:  # iterative: no recursion limit to hit
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body is nested deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            path = f"{where}.{key}" if where else str(key)
            for text in ((key, item) if isinstance(key, str) else (item,)):
                if isinstance(text, str) and not _valid_unicode(text):
                    raise ApiError(400, f"'{_printable(path)}' contains a lone UTF-16 surrogate; send valid Unicode text",
                                   param=_printable(path), code="invalid_value")
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1, path))
    return raw


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(path: str) -> str:
    return path.encode("utf-8", "replace").decode("utf-8")[:100]
