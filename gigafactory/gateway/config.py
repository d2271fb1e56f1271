"""The gateway's TOML, as typed dataclasses: replicas (URL, region, pool), regions with their rollout phases, the
SLO the canary is held to, health checking, routing and access. Every mistake is one UserError line naming the key.

    [[replicas]]                       # any OpenAI-compatible server: gigafactory serve, vLLM, SGLang
    url = "http://10.0.0.5:8000"
    region = "EU"
    pool = "grok-v2"                   # the model version this replica serves
    [regions.EU]
    countries = ["DE", "FR"]           # region header / key region values that mean this region
    fallback = "grok-v1"               # users outside the current phase (absent: they get 403, a launch rollout)
    [[regions.EU.phases]]
    pool = "grok-v2"
    percent = 10
    allow = ["early-tester"]
    start = 2026-12-01T08:00:00Z       # the earliest moment this phase may begin

A complete example with every key: docs/gateway.md.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, fields
from pathlib import Path

from gigafactory.config.fields import knob
from gigafactory.errors import UserError


@dataclass(frozen=True)
class Replica:
    url: str = knob("", "Base URL of an OpenAI-compatible server (http://host:port, no /v1).")
    region: str = knob("", "The region whose pool this replica belongs to.")
    pool: str = knob("", "The model version it serves; rollout phases and fallbacks name pools.")
    name: str = knob("", "Shown in logs, /metrics and /admin/status; default: the URL's host:port.")
    model: str = knob("", "The `model` sent upstream (the name the backend serves it under); default: the pool.")
    health_path: str = knob("", "Health route: /ready for gigafactory serve, /health for vLLM and SGLang; default: [health].path.")
    api_key_env: str = knob("", "Environment variable holding the backend's own API key (sent as Bearer), if it has keys.")


@dataclass(frozen=True)
class Phase:
    pool: str = knob("", "The pool serving the users admitted in this phase.")
    percent: float = knob(0.0, "Share of the region's users admitted (sha256(salt:user) in [0, 100) below it).")
    allow: tuple[str, ...] = knob((), "User ids admitted whatever their hash (early testers); kept by later phases.")
    start: float = knob(0.0, "Unix time before which the phase may not begin (TOML datetime with a zone).")


@dataclass(frozen=True)
class Region:
    name: str = knob("", "Region name as used by replicas and keys (e.g. EU).")
    countries: tuple[str, ...] = knob((), "Values of the region header or a key's region that mean this region.")
    fallback: str = knob("", "Pool for users outside the current phase; empty = they are refused (403).")
    phases: tuple[Phase, ...] = knob((), "The rollout, in order; the canary advances one phase at a time.")
    killed: bool = knob(False, "Kill switch: nobody gets a phase's pool (fallback only); the canary is frozen.")


@dataclass(frozen=True)
class Slo:
    window_s: float = knob(60.0, "Seconds of canary traffic the error rate and p99 latency are measured over.")
    max_error_rate: float = knob(0.02, "Largest share of canary requests that may fail (5xx, transport errors).")
    max_p99_s: float = knob(5.0, "Largest p99 time to the backend's first byte (TTFT for streams), seconds.")
    min_requests: int = knob(20, "Fewer canary requests in the window than this: no verdict, neither advance nor rollback.")
    hold_s: float = knob(300.0, "A phase runs at least this long inside the SLO before the next one starts.")
    evaluate_every_s: float = knob(5.0, "How often the canary controller looks at the window.")


@dataclass(frozen=True)
class Health:
    path: str = knob("/ready", "Default health route of a replica (gigafactory serve: /ready).")
    interval_s: float = knob(1.0, "Seconds between checks of each replica.")
    timeout_s: float = knob(2.0, "A check slower than this fails (a refused or reset connection fails at once).")
    failures_to_eject: int = knob(2, "Consecutive failed checks before a replica leaves the pool (a refused or reset connection: at once).")
    hung_after_s: float = knob(10.0, "Checks timing out this long: the requests waiting on the replica are cut loose (retried, or a stream's error event).")


@dataclass(frozen=True)
class Routing:
    prefix_chars: int = knob(200, "Characters of the system prompt hashed to pick the replica holding it in its prefix cache.")
    affinity_slack: int = knob(4, "A preferred (affinity/prefix) replica is used while its outstanding requests exceed the least-loaded one's by at most this.")
    max_attempts: int = knob(3, "Replicas tried for a request that has not streamed anything yet.")
    connect_timeout_s: float = knob(2.0, "Connecting to a replica.")
    read_timeout_s: float = knob(600.0, "Longest silence from a replica mid-request, then 504; a non-streamed answer is silent until done, so keep it above the backends' own request timeout.")
    cross_region: bool = knob(True, "A region with no healthy replica of a pool borrows another region's.")


MAX_WINDOW_S = 366 * 86400  # the longest token quota window


@dataclass(frozen=True)
class TokenQuota:
    tokens: int = knob(0, "Prompt + completion tokens each key may use per window (0 = unlimited); a key's own value in [token_quota.keys] wins.")
    window_s: float = knob(60.0, "The window, in seconds: 60 = tokens per minute, 86400 = per UTC day (windows start at multiples of it since the epoch).")
    keys: dict = knob(None, "Key name -> its own token limit per window ([token_quota.keys] alice = 200000).", factory=dict)


@dataclass(frozen=True)
class GatewayConfig:
    replicas: tuple[Replica, ...] = knob((), "The backends.")
    regions: dict = knob(None, "Region name -> Region.", factory=dict)
    slo: Slo = knob(None, "The canary's SLO.", factory=Slo)
    health: Health = knob(None, "Health checking.", factory=Health)
    routing: Routing = knob(None, "Routing.", factory=Routing)
    token_quota: TokenQuota = knob(None, "Token quotas per key, debited from each answer's usage.", factory=TokenQuota)
    api_keys: str = knob("", "TOML file of API keys (serve's format, plus requests_per_day); relative to this file.")
    rate_limit: float = knob(0.0, "Requests per minute per key (0 = unlimited); a key's own value wins.")
    pods: int = knob(1, "Gateway processes behind one load balancer (the Kubernetes Deployment's replicas); each enforces "
                        "1/pods of every rate limit and quota, as it sees about 1/pods of a key's traffic.")
    admin_key_env: str = knob("GIGAFACTORY_ADMIN_KEY", "Environment variable holding the admin key for /admin/*; unset = admin routes off.")
    default_region: str = knob("", "Region for requests whose region is unknown or absent; empty = refuse them (403).")
    region_header: str = knob("X-Region", "Header carrying the client's region, believed only from trusted proxies.")
    user_header: str = knob("X-User-Id", "Header carrying the user id when there is no API key, believed only from trusted proxies.")
    trusted_proxies: tuple[str, ...] = knob(("127.0.0.1", "::1"), "Addresses/networks whose region and user headers are believed.")
    salt: str = knob("", "Mixed into the user hash; changing it reshuffles who is inside a percentage.")
    decisions_log: str = knob("", "JSON-lines file of rollout decisions (advance, rollback, kill...); relative to this file.")
    state_file: str = knob("", "Where each region's phase is kept across restarts (JSON); relative to this file.")
    source: str = knob("", "The file this was read from (set by the loader).")

    def pools(self) -> set[str]:
        return {r.pool for r in self.replicas}

    def region_of(self, value: str | None) -> str | None:
        """A header/key value -> a configured region (by name or country), else default_region or None."""
        value = (value or "").strip().upper()
        if value in self.regions:
            return value
        for name, region in self.regions.items():
            if value in region.countries:
                return name
        return self.default_region or None

    def admin_key(self) -> str:
        return os.environ.get(self.admin_key_env, "") if self.admin_key_env else ""


def _fail(source: str, msg: str):
    raise UserError(f"gateway config {source}: {msg}")


def _build(cls, raw, where: str, src: str, **fixed):
    """A dataclass from a TOML table: unknown keys and wrong types are errors naming `where.key`."""
    if not isinstance(raw, dict):
        _fail(src, f"{where} must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known) - set(fixed))
    if unknown:
        _fail(src, f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(k for k in known if k not in fixed)}")
    values = dict(fixed)
    for key, value in raw.items():
        default = known[key].default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            if isinstance(value, dt.datetime) and key == "start":
                if value.tzinfo is None:
                    _fail(src, f"{where}.start needs a time zone (e.g. 2026-12-01T08:00:00Z)")
                value = value.timestamp()
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf
            if ok and type(default) is int:
                ok = isinstance(value, int)
        elif isinstance(default, tuple):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            _fail(src, f"{where}.{key} = {value!r} has the wrong type (expected like {default!r}, a finite number >= 0 for numbers)")
        values[key] = value
    return cls(**values)


def _base_url(text: str, where: str, source: str) -> str:
    """`text` without a trailing slash, once it is an http(s) URL with a host and a valid port."""
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
    except ValueError as err:
        _fail(source, f"{where} {text!r} is not a URL ({err})")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        _fail(source, f"{where} {text!r} must start with http:// or https://, then a host (and :PORT); no query")
    return text.rstrip("/")


def parse_config(text: str, source: str = "<text>", base_dir: Path | None = None) -> GatewayConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        _fail(source, f"not valid TOML ({err})")
    sections = {"replicas", "regions", "slo", "health", "routing", "token_quota"}
    top = {k: v for k, v in raw.items() if k not in sections}
    for key in ("trusted_proxies",):
        if key in top and isinstance(top[key], str):
            top[key] = [s.strip() for s in top[key].split(",") if s.strip()]
    cfg = _build(GatewayConfig, top, "top level", source, source=source)
    replicas = raw.get("replicas", [])
    if not isinstance(replicas, list) or not replicas:
        _fail(source, "no [[replicas]]; list each backend with url, region and pool")
    built = []
    for i, r in enumerate(replicas):
        rep = _build(Replica, r, f"replicas[{i}]", source)
        for key in ("url", "region", "pool"):
            if not getattr(rep, key):
                _fail(source, f"replicas[{i}] needs {key}")
        url = _base_url(rep.url, f"replicas[{i}].url", source)
        if rep.health_path and not rep.health_path.startswith("/"):
            _fail(source, f"replicas[{i}].health_path {rep.health_path!r} must start with /")
        built.append(Replica(url, rep.region.upper(), rep.pool, rep.name or url.split("://", 1)[1], rep.model or rep.pool,
                             rep.health_path, rep.api_key_env))
    names = [r.name for r in built]
    if len(set(names)) != len(names):
        _fail(source, f"replica names repeat ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); give each a name")
    pools = {r.pool for r in built}
    regions = {}
    raw_regions = raw.get("regions", {})
    if not isinstance(raw_regions, dict) or not raw_regions:
        _fail(source, "no [regions.NAME] table; every replica's region needs one")
    for name, body in raw_regions.items():
        body = dict(body) if isinstance(body, dict) else body
        phases_raw = body.pop("phases", []) if isinstance(body, dict) else []
        region = _build(Region, body, f"regions.{name}", source, name=name.upper())
        if not isinstance(phases_raw, list):
            _fail(source, f"regions.{name}.phases must be [[regions.{name}.phases]] tables")
        phases = tuple(_build(Phase, p, f"regions.{name}.phases[{i}]", source) for i, p in enumerate(phases_raw))
        for i, p in enumerate(phases):
            if p.pool not in pools:
                _fail(source, f"regions.{name}.phases[{i}].pool {p.pool!r} is served by no replica; pools: {', '.join(sorted(pools))}")
            if p.percent > 100:
                _fail(source, f"regions.{name}.phases[{i}].percent {p.percent:g} must be in 0..100")
            if i and p.percent < phases[i - 1].percent:
                _fail(source, f"regions.{name}.phases[{i}].percent goes down; each phase admits at least the previous one's users")
        if region.fallback and region.fallback not in pools:
            _fail(source, f"regions.{name}.fallback {region.fallback!r} is served by no replica; pools: {', '.join(sorted(pools))}")
        if not phases and not region.fallback:
            _fail(source, f"regions.{name} has neither phases nor a fallback pool, so it would serve nobody")
        regions[region.name] = Region(region.name, tuple(c.upper() for c in region.countries), region.fallback, phases,
                                      region.killed)
    for r in built:
        if r.region not in regions:
            _fail(source, f"replica {r.name} is in region {r.region!r}, which has no [regions.{r.region}] table")
    default_region = cfg.default_region.upper()
    if default_region and default_region not in regions:
        _fail(source, f"default_region {cfg.default_region!r} is not a configured region")
    sections_built = {}
    for key, cls in (("slo", Slo), ("health", Health), ("routing", Routing)):
        sections_built[key] = _build(cls, raw.get(key, {}), key, source)
    sections_built["token_quota"] = _token_quota(raw.get("token_quota", {}), source)
    if cfg.pods < 1:
        _fail(source, f"pods = {cfg.pods} must be >= 1 (the number of gateway processes sharing the traffic)")
    if not sections_built["health"].path.startswith("/"):
        _fail(source, f"health.path {sections_built['health'].path!r} must start with /")
    for key in ("region_header", "user_header"):
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", getattr(cfg, key)):
            _fail(source, f"{key} {getattr(cfg, key)!r} is not an HTTP header name")
    if not 0 <= sections_built["slo"].max_error_rate <= 1:
        _fail(source, "slo.max_error_rate must be a fraction in 0..1")
    for section, key in (("health", "interval_s"), ("health", "timeout_s"), ("slo", "window_s"),
                         ("slo", "evaluate_every_s"), ("routing", "connect_timeout_s"), ("routing", "read_timeout_s")):
        if getattr(sections_built[section], key) <= 0:
            _fail(source, f"{section}.{key} must be > 0")
    if sections_built["health"].failures_to_eject < 1 or sections_built["routing"].max_attempts < 1:
        _fail(source, "health.failures_to_eject and routing.max_attempts must be >= 1")
    import ipaddress
    for item in cfg.trusted_proxies:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            _fail(source, f"trusted_proxies: {item!r} is not an IP address or network")

    def resolve(path: str) -> str:
        return str((base_dir / path) if base_dir and path and not Path(path).is_absolute() else path)

    return GatewayConfig(tuple(built), regions, sections_built["slo"], sections_built["health"], sections_built["routing"],
                         sections_built["token_quota"], resolve(cfg.api_keys), cfg.rate_limit, cfg.pods, cfg.admin_key_env,
                         default_region, cfg.region_header, cfg.user_header, cfg.trusted_proxies, cfg.salt,
                         resolve(cfg.decisions_log), resolve(cfg.state_file), source)


def _token_quota(raw, source: str) -> TokenQuota:
    """[token_quota] with its [token_quota.keys] table of per-key limits (whole token counts >= 1, by key name)."""
    raw = dict(raw) if isinstance(raw, dict) else raw
    per_key = raw.pop("keys", {}) if isinstance(raw, dict) else {}
    quota = _build(TokenQuota, raw, "token_quota", source)
    if not 1 <= quota.window_s <= MAX_WINDOW_S:  # whole-second Retry-After; a window number that fits a float
        _fail(source, f"token_quota.window_s = {quota.window_s!r} must be between 1 (per second) and {MAX_WINDOW_S} "
                      "(a leap year) seconds; 60 = per minute, 86400 = per UTC day")
    if not isinstance(per_key, dict):
        _fail(source, "token_quota.keys must be a table of key name = tokens")
    for name, limit in per_key.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            _fail(source, f"token_quota.keys.{name} = {limit!r} must be a whole number of tokens >= 1")
    return TokenQuota(quota.tokens, quota.window_s, dict(per_key))


def load_config(path: str | Path) -> GatewayConfig:
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "file not found"
        raise UserError(f"gateway config {p}: {what}; see docs/gateway.md for an example")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"gateway config {p}: cannot read it ({err})") from None
    return parse_config(text, str(p), p.parent)
