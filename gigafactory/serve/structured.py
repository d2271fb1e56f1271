"""Structured output: `response_format` (and tool calls, serve/tools.py) enforced while decoding, with llguidance.

llguidance compiles a JSON schema or a Lark grammar against our byte-level BPE vocabulary and, at each step, gives
the set of tokens that keep the output inside the grammar (a few hundred microseconds for a small vocabulary). The
sampler removes every other token (inference/sampling.py), so even an untrained model writes text that parses and
validates; [EOS] is allowed only where the grammar accepts, so an answer cut short ends with finish_reason "length".

JSON is written compactly, like `json.dumps` (", " and ": " between items, no other whitespace): a model left free
to add whitespace can spend its whole budget on it, and tool-call streaming relies on the fixed layout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

import llguidance
import torch
from tokenizers import Tokenizer

from gigafactory.data.tokenizer import EOS_ID
from gigafactory.serve.protocol import ApiError

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_SCHEMA_CHARS = 64_000  # a schema this long is refused before compiling (compile time grows with it)
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)  # error messages go to clients: no grammar dumps


@lru_cache(maxsize=8)
def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (built once per served tokenizer: it indexes every token's bytes)."""
    return llguidance.LLTokenizer(tokenizer.to_str(), eos_token=EOS_ID)


class GrammarConstraint:
    """One sequence's grammar state: consumes the tokens it has not seen, then says which may come next."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str, matcher: llguidance.LLMatcher | None = None):
        self.tokenizer, self.grammar = tokenizer, grammar
        self.matcher = matcher or llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=_LIMITS)
        # the start state, copied before any token, for the request's other choices (a copy costs microseconds,
        # compiling again milliseconds, on the event loop)
        self._start = self.matcher.deep_copy() if matcher is None else None
        self.consumed = 0

    def fresh(self) -> "GrammarConstraint":
        """A new state at the start of the same grammar (one per choice when n > 1)."""
        start = self._start or llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0, limits=_LIMITS)
        return GrammarConstraint(self.tokenizer, self.grammar, start.deep_copy())

    def allowed(self, output_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
        if len(output_ids) < self.consumed:
            raise RuntimeError("the constraint saw more tokens than the sequence has (one constraint per sequence)")
        for token in output_ids[self.consumed:]:
            if not self.matcher.consume_token(token):
                raise RuntimeError(f"token {token} broke the grammar: {self.matcher.get_error()}")
            self.consumed += 1
        mask = torch.frombuffer(bytearray(self.matcher.compute_logit_bias()), dtype=torch.uint8).bool()
        if self.matcher.is_error():
            raise RuntimeError(f"grammar failed: {self.matcher.get_error()}")
        out = torch.zeros(vocab_size, dtype=torch.bool)  # the model's vocabulary may be padded past the tokenizer's
        n = min(vocab_size, mask.numel())
        out[:n] = mask[:n]
        return out


def compile_grammar(tokenizer: Tokenizer, grammar: str, param: str) -> GrammarConstraint:
    """The constraint for an llguidance grammar, or a 400 naming `param` when it does not compile (an unknown type,
    an unsupported keyword, a contradiction)."""
    lt = ll_tokenizer(tokenizer)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lt, limits=_LIMITS)
    if failed:
        raise ApiError(400, f"'{param}' cannot be enforced: {_one_line((messages or ['invalid grammar'])[0])}",
                       param=param, code="invalid_value")
    constraint = GrammarConstraint(lt, grammar)
    if not constraint.matcher.is_error():
        constraint.matcher.compute_logit_bias()  # some grammars (`{"$ref": "#"}`) fail only at their first token
    if constraint.matcher.is_error():
        raise ApiError(400, f"'{param}' cannot be enforced: {_one_line(constraint.matcher.get_error())}", param=param,
                       code="invalid_value")
    return constraint


def _one_line(message: str) -> str:
    return " ".join(message.split())[:300]


def json_schema_grammar(schema: dict, param: str) -> str:
    """An llguidance grammar for JSON matching `schema`, laid out compactly (unless the schema's own `x-guidance`
    says otherwise)."""
    try:
        too_long = len(json.dumps(schema)) > MAX_SCHEMA_CHARS
    except (RecursionError, ValueError):  # the HTTP body's depth and NaN checks stop these first; kept for callers
        raise ApiError(400, f"'{param}' is nested too deeply or holds NaN", param=param, code="invalid_value") from None
    if too_long:
        raise ApiError(400, f"'{param}' is over {MAX_SCHEMA_CHARS} characters of JSON schema", param=param,
                       code="invalid_value")
    loop = ref_loop(schema)
    if loop:
        raise ApiError(400, f"'{param}' cannot be enforced: $ref {loop!r} leads back to itself without an object or "
                            "array in between (it would never write a character)", param=param, code="invalid_value")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as err:
        raise ApiError(400, f"'{param}' is not a usable JSON schema: {_one_line(str(err))}", param=param,
                       code="invalid_value") from None


def ref_loop(schema) -> str:
    """A local `$ref` that reaches itself through only $refs and anyOf/oneOf/allOf, else ''. llguidance compiles such
    a schema and fails only when decoding reaches it (a 500 mid-answer), so it is refused up front."""
    nodes: dict[str, object] = {}

    def collect(node, pointer: str) -> None:
        nodes[pointer] = node
        if isinstance(node, dict):
            for key, value in node.items():
                collect(value, f"{pointer}/{str(key).replace('~', '~0').replace('/', '~1')}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                collect(value, f"{pointer}/{i}")

    def steps(pointer: str) -> list[str]:
        node = nodes.get(pointer)
        if not isinstance(node, dict):
            return []
        out = [node["$ref"].rstrip("/")] if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#") else []
        for key in ("anyOf", "oneOf", "allOf"):
            if isinstance(node.get(key), list):
                out += [f"{pointer}/{key}/{i}" for i in range(len(node[key]))]
        return out

    collect(schema, "#")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in nodes:
        stack = [(start, iter(steps(start)))]
        state.setdefault(start, 1)
        while stack:
            pointer, successors = stack[-1]
            nxt = next(successors, None)
            if nxt is None:
                state[pointer] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return nxt
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(steps(nxt))))
    return ""


def response_format_constraint(tokenizer: Tokenizer, response_format) -> GrammarConstraint | None:
    """The constraint a request's `response_format` asks for: none for text, any JSON object for json_object, the
    schema for json_schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return compile_grammar(tokenizer, json_schema_grammar({"type": "object"}, "response_format"), "response_format")
    param = "response_format.json_schema.schema"
    schema = response_format.json_schema.schema_ or {}
    return compile_grammar(tokenizer, json_schema_grammar(schema, param), param)
