"""Token quotas per API key, and each gateway pod's share of every limit.

A key's prompt + completion tokens are counted per fixed window (`token_quota.window_s` seconds, windows starting at
multiples of it since the epoch, so 86400 is a UTC day). A request is admitted while the key's count is below its
limit and debited afterwards, from the answer's `usage`: the tokens are only known once the replica has answered, so
a key may overshoot its limit by what its requests already in flight use (OpenAI's limits behave the same way). Once
over, every request is a 429 with Retry-After until the window ends, before any replica is touched.

With `pods` gateway processes behind one load balancer, each sees about 1/pods of a key's traffic and enforces
1/pods of its limits (`pod_share`): exact when a key's requests spread evenly over the pods, strict (never above the
configured total, except that no share is below 1) when they do not.
"""

from __future__ import annotations

import math
import threading
import time

from gigafactory.gateway.config import TokenQuota


def pod_share(limit: float | None, pods: int, whole: bool = False) -> float | None:
    """This pod's part of a fleet-wide limit (None or 0 = unlimited stays so); `whole` rounds down to a count >= 1."""
    if not limit or pods <= 1:
        return limit
    return max(1, math.floor(limit) // pods) if whole else limit / pods  # // : exact for counts of any size


class TokenLedger:
    """Tokens used per key in the current window, in this process."""

    def __init__(self, quota: TokenQuota, pods: int = 1, clock=time.time):
        self.quota, self.pods, self.clock = quota, pods, clock
        self._used: dict[str, tuple[int, int]] = {}  # key secret -> (window number, tokens)
        self._lock = threading.Lock()

    def limit(self, key_name: str) -> int:
        """The key's limit per window for this pod; 0 = unlimited."""
        return pod_share(self.quota.keys.get(key_name, self.quota.tokens), self.pods, whole=True) or 0

    def used(self, secret: str, now: float | None = None) -> int:
        window = self._window(now)
        with self._lock:
            seen, used = self._used.get(secret, (window, 0))
        return used if seen == window else 0

    def check(self, secret: str, key_name: str, now: float | None = None) -> float:
        """0 if the key is below its limit, else the seconds until its window ends (nothing is counted here)."""
        limit = self.limit(key_name)
        now = self.clock() if now is None else now
        if not limit or self.used(secret, now) < limit:
            return 0.0
        return (self._window(now) + 1) * self.quota.window_s - now

    def debit(self, secret: str, tokens: int, now: float | None = None) -> None:
        if tokens <= 0:
            return
        window = self._window(now)
        with self._lock:
            seen, used = self._used.get(secret, (window, 0))
            self._used[secret] = (window, (used if seen == window else 0) + tokens)

    def update(self, quota: TokenQuota, pods: int) -> None:
        """A reloaded config: new limits apply at once; what keys used so far is kept."""
        self.quota, self.pods = quota, pods

    def _window(self, now: float | None) -> int:
        return int((self.clock() if now is None else now) // self.quota.window_s)
