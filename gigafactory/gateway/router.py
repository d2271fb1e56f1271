"""Which replica takes a request: least outstanding requests, unless an affinity key prefers another.

The affinity key is the hash of the first `prefix_chars` characters of the system prompt when there is one (every
request sharing that prompt lands where the prompt already sits in the prefix cache, and a user's conversation, which
starts with it, stays there too), else the user id (session affinity: the user's earlier turns are cached there).
The preferred replica is the key's rendezvous-hash winner among the healthy candidates, so when a replica leaves
only its own keys move. It is taken while it has at most `affinity_slack` more requests in flight than the least
loaded candidate; beyond that, load wins over the cache.
"""

from __future__ import annotations

import hashlib

from gigafactory.gateway.pool import ReplicaState


def _score(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def preferred(candidates: list[ReplicaState], key: str) -> ReplicaState:
    """The rendezvous (highest random weight) winner for `key`."""
    return max(candidates, key=lambda s: _score(key, s.name))


def choose(candidates: list[ReplicaState], key: str | None, slack: int, exclude: set[str] = frozenset()) -> ReplicaState | None:
    live = [s for s in candidates if s.name not in exclude]
    if not live:
        return None
    least = min(live, key=lambda s: (s.outstanding, s.assigned))
    if key:
        best = preferred(live, key)
        if best.outstanding <= least.outstanding + slack:
            return best
    return least


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones, in order
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def affinity_key(body: dict, user: str | None, prefix_chars: int) -> str | None:
    """'prefix:<hash>' for a system prompt (chat) or a prompt at least `prefix_chars` long (completions), else
    'user:<id>', else None."""
    head = ""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict) and messages[0].get("role") in ("system", "developer"):
        head = _text(messages[0].get("content"))[:prefix_chars]
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str) and prefix_chars and len(prompt) >= prefix_chars:
        head = prompt[:prefix_chars]
    if head:
        return "prefix:" + hashlib.sha256(head.encode("utf-8", "replace")).hexdigest()[:16]
    return f"user:{user}" if user else None
