"""The Grok family (Grok-1 exact, Grok-2-style and Mixtral-style variants via config)."""

from gigafactory.models.grok.model import GrokModel, KVCache

__all__ = ["GrokModel", "KVCache"]
