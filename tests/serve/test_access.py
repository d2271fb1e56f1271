"""API keys (401), per-key rate limit (429 + Retry-After), and the key's region for the rollout."""

from __future__ import annotations

import httpx
import openai
import pytest

from gigafactory.errors import UserError
from gigafactory.serve.access import RateLimiter, load_keys
from gigafactory.serve.rollout import RolloutPolicy
from tests.serve.conftest import make_state, running_server

KEYS = """
[keys."sk-alice"]
name = "alice"
region = "US"
[keys."sk-bob"]
name = "bob"
region = "GB"
requests_per_minute = 12
"""


def test_rate_limiter_bucket():
    limiter = RateLimiter(60)  # 1/s, bursts of 10
    assert all(limiter.check("k", now=0.0) == 0 for _ in range(10))
    wait = limiter.check("k", now=0.0)
    assert 0.9 < wait <= 1.0
    assert limiter.check("k", now=1.01) == 0
    assert RateLimiter(0).check("k") == 0  # unlimited


def test_key_file_and_env(tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text(KEYS)
    keys = load_keys(str(f), env="sk-env1, sk-env2")
    assert set(keys) == {"sk-alice", "sk-bob", "sk-env1", "sk-env2"} and keys["sk-bob"].requests_per_minute == 12
    with pytest.raises(UserError, match="not found"):
        load_keys(str(tmp_path / "missing.toml"), env="")
    f.write_text('[keys."x"]\nrequests_per_minute = -1\n')
    with pytest.raises(UserError, match="positive"):
        load_keys(str(f), env="")


def test_keys_rate_limit_and_key_region(loaded, tmp_path):
    f = tmp_path / "keys.toml"
    f.write_text(KEYS)
    policy = tmp_path / "rollout.toml"
    policy.write_text('default = "off"\n[regions.US]\nstate = "on"\n')
    state = make_state(loaded, n_slots=2, keys=load_keys(str(f), env=""), limiter=RateLimiter(600))
    state.rollout = RolloutPolicy(policy, state.metrics)
    body = {"prompt": "In", "max_tokens": 2}
    with running_server(state) as url:
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key

        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-alice", max_retries=0)
        assert client.completions.create(model="grok-tiny", prompt="In", max_tokens=2).choices  # key region US: on
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()

        bob = {"Authorization": "Bearer sk-bob"}
        r = httpx.post(url + "/v1/completions", json=body, headers=bob)  # key region GB: off
        assert r.status_code == 403 and "region GB" in r.json()["error"]["message"]
        assert httpx.post(url + "/v1/completions", json=body, headers={**bob, "X-Region": "US"}).status_code == 200
        r = httpx.post(url + "/v1/completions", json=body, headers={**bob, "X-Region": "US"})  # bob: 12/min, a burst of 2 (the 403 counted too)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 'gigafactory_serve_rate_limited_total{key="bob"} 1' in httpx.get(url + "/metrics").text
