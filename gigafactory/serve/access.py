"""API keys and a per-key rate limit (token bucket).

Keys come from a TOML file (`--api-keys FILE`) or the GIGAFACTORY_API_KEYS environment variable (comma-separated).
File format, one table per key:

    [keys."sk-alice-..."]
    name = "alice"            # shown in /metrics and logs instead of the secret
    region = "DE"             # used for the rollout when the trusted region header is absent
    requests_per_minute = 60  # overrides --rate-limit for this key
    requests_per_day = 5000   # gateway only (load_keys(..., quotas=True)): a daily quota per key, UTC days
"""

from __future__ import annotations

import hmac
import math
import os
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from gigafactory.errors import UserError


@dataclass(frozen=True)
class ApiKey:
    secret: str
    name: str
    region: str | None = None
    requests_per_minute: float | None = None
    requests_per_day: int | None = None  # enforced by `gigafactory gateway` (DailyQuota); serve refuses the field



def load_keys(path: str | None, env: str | None = None, quotas: bool = False) -> dict[str, ApiKey]:
    """Keys from the file and/or the env value; an empty result means the server is open (no 401s).
    quotas=True (the gateway) also accepts `requests_per_day`; serve does not enforce it, so there it is an error."""
    keys: dict[str, ApiKey] = {}
    env = os.environ.get("GIGAFACTORY_API_KEYS", "") if env is None else env
    for i, secret in enumerate(s.strip() for s in env.split(",")):
        if secret:
            keys[secret] = ApiKey(secret, f"env-{i}")
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            raise UserError(f"--api-keys {p}: is a directory; give the TOML file of keys")
        if not p.is_file():
            raise UserError(f"--api-keys {p}: file not found; write a TOML file with [keys.\"SECRET\"] tables")
        try:
            raw = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"--api-keys {p}: not valid TOML ({err}); fix the file") from None
        unknown = sorted(set(raw) - {"keys"})
        if unknown:  # e.g. a misspelled [key."sk-x"]: starting open to anyone would be the wrong guess
            raise UserError(f"--api-keys {p}: unknown table(s) {', '.join(unknown)}; keys go in [keys.\"SECRET\"] tables")
        if not isinstance(raw.get("keys", {}), dict):
            raise UserError(f"--api-keys {p}: keys must be tables, [keys.\"SECRET\"]")
        for secret, entry in raw.get("keys", {}).items():
            if not isinstance(entry, dict):
                raise UserError(f"--api-keys {p}: keys.{secret[:6]}... must be a table with name/region/requests_per_minute")
            allowed = {"name", "region", "requests_per_minute"} | ({"requests_per_day"} if quotas else set())
            extra = sorted(set(entry) - allowed)
            if extra:
                raise UserError(f"--api-keys {p}: keys.{secret[:6]}... has unknown field(s) {', '.join(extra)}; "
                                f"use {', '.join(sorted(allowed))}")
            if not secret.strip():
                raise UserError(f"--api-keys {p}: a key's secret is empty")
            rpm = entry.get("requests_per_minute")
            if rpm is not None and (isinstance(rpm, bool) or not isinstance(rpm, (int, float)) or not 0 < rpm < float("inf")):
                raise UserError(f"--api-keys {p}: requests_per_minute must be a positive number")
            region = entry.get("region")
            if region is not None and not isinstance(region, str):
                raise UserError(f"--api-keys {p}: keys.{secret[:6]}... region must be a string such as \"DE\"")
            per_day = entry.get("requests_per_day")
            if per_day is not None and (isinstance(per_day, bool) or not isinstance(per_day, int) or per_day < 1):
                raise UserError(f"--api-keys {p}: requests_per_day must be a whole number >= 1")
            keys[secret] = ApiKey(secret, str(entry.get("name", secret[:6] + "...")), region, rpm, per_day)
        if not raw.get("keys"):
            raise UserError(f"--api-keys {p}: the file defines no key, so the server would be open to anyone; "
                            "add [keys.\"SECRET\"] tables or drop --api-keys")
    return keys


def find_key(keys: dict[str, ApiKey], presented: str | None) -> ApiKey | None:
    """Constant-time comparison against every configured key."""
    if not presented:
        return None
    found = None
    for secret, key in keys.items():
        if hmac.compare_digest(secret.encode(), presented.encode()):
            found = key
    return found


class RateLimiter:
    """A token bucket per key: `rpm` requests per minute on average, bursts of up to `burst` (default rpm/6, >= 1)."""

    def __init__(self, requests_per_minute: float = 0.0):
        self.default_rpm = requests_per_minute  # 0 = unlimited
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self._lock = threading.Lock()

    def check(self, key: str, rpm: float | None = None, now: float | None = None) -> float:
        """0 if the request may go ahead (and is counted), else the seconds to wait before retrying."""
        rpm = rpm or self.default_rpm
        if not rpm:
            return 0.0
        now = time.monotonic() if now is None else now
        rate, burst = rpm / 60.0, max(1.0, rpm / 6.0)
        with self._lock:
            tokens, last = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - last) * rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / rate


class DailyQuota:
    """Requests per key per UTC day; counted when admitted, reset at midnight UTC. In memory: one gateway process
    enforces it for every replica behind it."""

    def __init__(self):
        self._used: dict[str, tuple[int, int]] = {}  # key -> (day number, requests)
        self._lock = threading.Lock()

    def check(self, key: str, per_day: int | None, now: float | None = None) -> float:
        """0 if the request may go ahead (and is counted), else the seconds until the quota resets."""
        if not per_day:
            return 0.0
        now = time.time() if now is None else now
        day = int(now // 86400)
        with self._lock:
            seen_day, used = self._used.get(key, (day, 0))
            used = used if seen_day == day else 0
            if used >= per_day:
                return (day + 1) * 86400 - now
            self._used[key] = (day, used + 1)
            return 0.0


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
