"""The phased regional rollout: who may use the service, by region and share of users, reloaded without restart.

A policy file (see rollout.example.toml) maps regions to a state:
  off            nobody in the region is admitted
  on             everyone is admitted
  percent N      a user is admitted if hash(salt, user id) falls in the first N% (the same user, the same answer)
  allowlist      only the user ids listed in `allow`
and optionally a `model` that serves the region. A region is an ISO country code (`DE`) or a group from [groups]
(`EU`); a country's own entry wins over its group's, and `default` covers everything else (and a missing region).
The region comes from the operator's trusted header (`region_header`, set by the proxy, never by the client) or
from the API key's configured region; the user id is the API key's name when there is a key, else `user_header`.
Headers are believed only from the server's trusted proxies (see api_server.ServerState.trusted_proxies).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gigafactory.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionRule:
    state: str  # off | on | percent | allowlist
    percent: float = 0.0
    allow: frozenset[str] = frozenset()
    model: str | None = None


@dataclass(frozen=True)
class Decision:
    admitted: bool
    region: str
    rule: str  # the policy entry that decided (region code, group name or "default")
    state: str
    model: str | None
    reason: str = ""


@dataclass(frozen=True)
class Policy:
    region_header: str = "X-Region"
    user_header: str = "X-User-Id"
    salt: str = ""
    default: RegionRule = RegionRule("off")
    regions: dict[str, RegionRule] = field(default_factory=dict)
    groups: dict[str, frozenset[str]] = field(default_factory=dict)

    def metric_label(self, region: str) -> str:
        """The region as a /metrics label: one the policy names (a region, a group or a group's member), else
        "other", so a client inventing X-Region values cannot add series."""
        if region in self.regions or region in self.groups or any(region in m for m in self.groups.values()):
            return region
        return "unknown" if region == "UNKNOWN" else "other"

    def rule_for(self, region: str) -> tuple[str, RegionRule]:
        region = region.upper()
        if region in self.regions:
            return region, self.regions[region]
        for group, members in sorted(self.groups.items()):
            if region in members and group in self.regions:
                return group, self.regions[group]
        return "default", self.default

    def decide(self, region: str, user: str | None) -> Decision:
        where, rule = self.rule_for(region or "")
        region = (region or "unknown").upper()

        def verdict(ok: bool, reason: str = "") -> Decision:
            return Decision(ok, region, where, rule.state, rule.model, reason)

        if rule.state == "on":
            return verdict(True)
        if rule.state == "off":
            return verdict(False, f"Grok is not yet available in region {region}.")
        if not user:
            return verdict(False, f"Grok is rolling out in region {region} to some users; send a user id "
                                  f"(header {self.user_header} or an API key) to check access.")
        if rule.state == "allowlist":
            return verdict(user in rule.allow, f"Grok is available in region {region} to invited users only.")
        return verdict(bucket(self.salt, user) < rule.percent,
                       f"Grok is rolling out in region {region} to {rule.percent:g}% of users; you are not yet included.")


def bucket(salt: str, user: str) -> float:
    """A stable number in [0, 100) for a user: the first 8 bytes of sha256(salt:user), scaled."""
    digest = hashlib.sha256(f"{salt}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def _rule(name: str, raw) -> RegionRule:
    if isinstance(raw, str):
        raw = {"state": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("state"), str):
        raise UserError(f"rollout region {name!r}: give a table with state = \"off\" | \"on\" | \"percent N\" | \"allowlist\"")
    words = raw["state"].split()
    model = raw.get("model")
    if words == ["on"] or words == ["off"]:
        return RegionRule(words[0], model=model)
    if words == ["allowlist"]:
        allow = raw.get("allow", [])
        if not isinstance(allow, list) or not all(isinstance(u, str) for u in allow):
            raise UserError(f"rollout region {name!r}: allow must be a list of user id strings")
        return RegionRule("allowlist", allow=frozenset(allow), model=model)
    if len(words) == 2 and words[0] == "percent":
        try:
            pct = float(words[1].rstrip("%"))
        except ValueError:
            pct = -1
        if 0 <= pct <= 100:
            return RegionRule("percent", percent=pct, model=model)
    raise UserError(f"rollout region {name!r}: state {raw['state']!r} must be off, on, \"percent N\" (0-100) or allowlist")


def parse_policy(text: str, source: str = "policy") -> Policy:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"rollout policy {source}: not valid TOML ({err}); fix the file") from None
    groups = {g.upper(): frozenset(c.upper() for c in members) for g, members in raw.get("groups", {}).items()}
    regions = {r.upper(): _rule(r, v) for r, v in raw.get("regions", {}).items()}
    return Policy(raw.get("region_header", "X-Region"), raw.get("user_header", "X-User-Id"), str(raw.get("salt", "")),
                  _rule("default", raw.get("default", "off")), regions, groups)


class RolloutPolicy:
    """The live policy: checks the file's mtime on use (at most every `check_every` s) and on SIGHUP (`reload()`).
    A broken file keeps the last good policy and is logged and counted, never taking the service down."""

    def __init__(self, path: str | Path, metrics=None, check_every: float = 1.0):
        self.path, self.metrics, self.check_every = Path(path), metrics, check_every
        if not self.path.is_file():
            raise UserError(f"--rollout {self.path}: file not found; see gigafactory/serve/rollout.example.toml")
        self.policy = parse_policy(self.path.read_text(), str(self.path))
        self._stamp = self._mtime()
        self._checked = 0.0
        self._lock = threading.Lock()

    def _mtime(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size)
        except OSError:
            return None

    def reload(self) -> bool:
        with self._lock:
            self._stamp = self._mtime()
            try:
                self.policy = parse_policy(self.path.read_text(), str(self.path))
            except (UserError, OSError) as err:
                log.error("rollout policy not reloaded, keeping the previous one: %s", err)
                self._count("error")
                return False
            log.info("rollout policy reloaded from %s", self.path)
            self._count("ok")
            return True

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.rollout_reloads.inc(result=result)

    def maybe_reload(self, now: float) -> None:
        if now - self._checked >= self.check_every:
            self._checked = now
            if self._mtime() != self._stamp:
                self.reload()

    def decide(self, region: str, user: str | None, now: float) -> Decision:
        self.maybe_reload(now)
        d = self.policy.decide(region, user)
        if self.metrics is not None:
            self.metrics.rollout.inc(region=self.policy.metric_label(d.region), rule=d.rule, state=d.state,
                                     decision="admit" if d.admitted else "deny")
        return d
