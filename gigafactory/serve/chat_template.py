"""The chat template serve prompts with; it lives in gigafactory/data/chat.py so SFT trains on the same encoding."""

from gigafactory.data.chat import ROLE_TOKENS, ROLES, ChatTemplate

__all__ = ["ChatTemplate", "ROLES", "ROLE_TOKENS"]
