"""The chat template: a list of {role, content} messages -> the token ids the model continues; and, for training,
the same ids with a mask of the tokens the assistant wrote (the only ones SFT puts a loss on).

If the tokenizer has role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, added by the data pipeline for chat
data), each turn is `<|role|>content[EOS]` and the prompt ends with `<|assistant|>`; the model's [EOS] ends its turn.
Otherwise (a plain pretrained tokenizer) each turn is `Role: content` followed by a blank line, the prompt ends with
`Assistant:`, and generation also stops at the next "\nUser:" so the model does not write the user's turn.

Message text goes through the plain-text encoder: a user who types "[EOS]" or "<|assistant|>" gets those
characters, never the control tokens, so nobody can end a turn or forge one. Control tokens are added by id.
Lives in data/ (not serve/) because training encodes conversations exactly as serving prompts them.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from gigafactory.data.tokenizer import EOS_ID
from gigafactory.errors import UserError

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
                ids += self._turn(m)
            return ids + [self.role_ids["assistant"]]
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"
        return self.encoder.encode(text).ids

    def _turn(self, m: dict) -> list[int]:
        return [self.role_ids[m["role"]], *self.encoder.encode(m["content"]).ids, EOS_ID]

    def encode_conversation(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(ids, trained): the whole conversation, and True on each token an assistant turn wrote (its content and
        closing [EOS], not its role token, which the prompt supplies). For every assistant turn i the ids before its
        content are exactly encode(messages[:i]), so the model learns to continue what serve prompts it with."""
        if not self.special:  # BPE merges across "Assistant:" + reply would make prompt and training ids disagree
            raise UserError("chat training needs a tokenizer with the role tokens <|system|>, <|user|>, <|assistant|> "
                            "(every tokenizer `gigafactory data tokenizer` trains has them)")
        ids: list[int] = []
        trained: list[bool] = []
        for m in messages:
            turn = self._turn(m)
            ids += turn
            trained += [False] + [m["role"] == "assistant"] * (len(turn) - 1)
        return ids, trained
