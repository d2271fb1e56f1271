"""The chat template: a list of {role, content} messages -> the token ids the model continues.

If the tokenizer has role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, added by the data pipeline for chat
data), each turn is `<|role|>content[EOS]` and the prompt ends with `<|assistant|>`; the model's [EOS] ends its turn.
Otherwise (a plain pretrained tokenizer) each turn is `Role: content` followed by a blank line, the prompt ends with
`Assistant:`, and generation also stops at the next "\nUser:" so the model does not write the user's turn.

Message text goes through the plain-text encoder: a user who types "[EOS]" or "<|assistant|>" gets those
characters, never the control tokens, so nobody can end a turn or forge one. Control tokens are added by id.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from gigafactory.data.tokenizer import EOS_ID

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, text_encoder: Tokenizer):
        self.role_ids = {r: tokenizer.token_to_id(t) for r, t in ROLE_TOKENS.items()}
        self.special = all(i is not None for i in self.role_ids.values())
        self.encoder = text_encoder

    @property
    def stop(self) -> list[str]:
        """Stop strings every chat request gets on top of its own."""
        return [] if self.special else ["\nUser:", "\nSystem:"]

    def encode(self, messages: list[dict]) -> list[int]:
        if self.special:
            ids: list[int] = []
            for m in messages:
                ids += [self.role_ids[m["role"]], *self.encoder.encode(m["content"]).ids, EOS_ID]
            return ids + [self.role_ids["assistant"]]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        return self.encoder.encode(text).ids
