"""The chat template: a list of {role, content} messages -> the prompt text the model continues.

If the tokenizer has role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, added by the data pipeline for chat
data), each turn is `<|role|>content[EOS]` and the prompt ends with `<|assistant|>`; the model's [EOS] ends its turn.
Otherwise (a plain pretrained tokenizer) each turn is `Role: content` followed by a blank line, the prompt ends with
`Assistant:`, and generation also stops at the next "\nUser:" so the model does not write the user's turn.
"""

from __future__ import annotations

from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer):
        self.special = all(tokenizer.token_to_id(t) is not None for t in ROLE_TOKENS.values())

    @property
    def stop(self) -> list[str]:
        """Stop strings every chat request gets on top of its own."""
        return [] if self.special else ["\nUser:", "\nSystem:"]

    def render(self, messages: list[dict]) -> str:
        if self.special:
            return "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}[EOS]" for m in messages) + ROLE_TOKENS["assistant"]
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
