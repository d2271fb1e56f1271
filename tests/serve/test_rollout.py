"""The phased regional rollout: percent by stable hash, off, allowlist, groups, reload, 403s and metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from gigafactory.errors import UserError
from gigafactory.serve.metrics import Metrics
from gigafactory.serve.rollout import RolloutPolicy, parse_policy
from tests.serve.conftest import make_state, running_server

POLICY = """
salt = "s1"
default = "off"
[groups]
EU = ["DE", "FR", "IT"]
[regions.EU]
state = "percent 10"
[regions.FR]
state = "allowlist"
allow = ["alice", "bob"]
[regions.US]
state = "on"
"""


def test_percent_admits_about_that_share_and_always_the_same_users():
    policy = parse_policy(POLICY)
    users = [f"user-{i}" for i in range(10_000)]
    first = {u for u in users if policy.decide("DE", u).admitted}
    assert abs(len(first) / len(users) - 0.10) <= 0.02
    assert first == {u for u in users if policy.decide("it", u).admitted}  # same users, any EU country, any case
    wider = parse_policy(POLICY.replace("percent 10", "percent 30"))
    assert first <= {u for u in users if wider.decide("DE", u).admitted}  # raising the percentage only adds users


def test_off_allowlist_on_and_country_over_group():
    policy = parse_policy(POLICY)
    assert not policy.decide("GB", "anyone").admitted  # default off
    assert not policy.decide("", "anyone").admitted  # no region -> default
    assert policy.decide("US", None).admitted
    assert policy.decide("FR", "alice").admitted and not policy.decide("FR", "carol").admitted
    assert not any(policy.decide("FR", f"user-{i}").admitted for i in range(500))  # FR's own rule beats EU's percent
    d = policy.decide("DE", None)
    assert not d.admitted and "user id" in d.reason


@pytest.mark.parametrize("bad", ['default = "percent 150"', 'default = "maybe"', "[regions.X]\nallow = 3",
                                 '[regions.X]\nstate = "allowlist"\nallow = [1]', "default = "])
def test_bad_policies_are_one_line_user_errors(bad):
    with pytest.raises(UserError):
        parse_policy(bad)


def test_reload_on_file_change_and_on_request(tmp_path):
    path = tmp_path / "rollout.toml"
    path.write_text(POLICY)
    metrics = Metrics()
    live = RolloutPolicy(path, metrics, check_every=0)
    assert not live.decide("GB", "u", time.monotonic()).admitted
    path.write_text(POLICY + '[regions.GB]\nstate = "on"\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    assert live.decide("GB", "u", time.monotonic()).admitted  # picked up without restart
    path.write_text("default = [broken")  # a broken file keeps the last good policy
    assert not live.reload() and live.policy.decide("GB", "u").admitted
    assert metrics.rollout_reloads.get(result="ok") == 1 and metrics.rollout_reloads.get(result="error") == 1
    # GB was not in the policy then: its label is "other" (a client cannot add series by inventing regions)
    assert metrics.rollout.get(region="other", rule="default", state="off", decision="deny") == 1
    assert metrics.rollout.get(region="GB", rule="GB", state="on", decision="admit") == 1


def test_server_rollout_403_region_model_and_metrics(loaded, tmp_path):
    path = tmp_path / "rollout.toml"
    path.write_text(POLICY + '[regions.CA]\nstate = "on"\nmodel = "grok-b"\n')
    state = make_state(loaded, n_slots=2, names=("grok-a", "grok-b"))
    state.rollout = RolloutPolicy(path, state.metrics, check_every=0)
    body = {"prompt": "In", "max_tokens": 2}
    with running_server(state) as url:
        r = httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "GB", "X-User-Id": "u1"})
        assert r.status_code == 403 and "not yet available in region GB" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "not_in_rollout"
        assert httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "FR", "X-User-Id": "alice"}).status_code == 200
        assert httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "FR", "X-User-Id": "eve"}).status_code == 403
        ok = httpx.post(url + "/v1/completions", json={**body, "model": "grok-a"}, headers={"X-Region": "CA"})
        assert ok.status_code == 200 and ok.json()["model"] == "grok-b"  # the region's model serves it
        path.write_text(POLICY + '[regions.GB]\nstate = "on"\n')
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert httpx.post(url + "/v1/completions", json=body, headers={"X-Region": "GB", "X-User-Id": "u1"}).status_code == 200
        text = httpx.get(url + "/metrics").text
    assert 'gigafactory_serve_rollout_decisions_total{decision="deny",region="other",rule="default",state="off"} 1' in text
    assert 'gigafactory_serve_rollout_decisions_total{decision="admit",region="FR",rule="FR",state="allowlist"} 1' in text
    assert 'status="403"' in text


def test_example_policy_parses():
    import gigafactory.serve

    example = Path(gigafactory.serve.__file__).parent / "rollout.example.toml"
    policy = parse_policy(example.read_text())
    assert policy.rule_for("DE")[0] == "EU" and policy.rule_for("FR")[0] == "FR"
