"""Router and config in-process: least outstanding requests, affinity that yields to load, rendezvous stability,
region pools with cross-region failover, and one-line config errors."""

from __future__ import annotations

import pytest

from gigafactory.errors import UserError
from gigafactory.gateway import router
from gigafactory.gateway.config import Replica, parse_config
from gigafactory.gateway.pool import ReplicaState


def states(*loads: int) -> list[ReplicaState]:
    return [ReplicaState(Replica(f"http://r{i}", "EU", "p", f"r{i}"), healthy=True, outstanding=n) for i, n in enumerate(loads)]


def test_least_outstanding_and_round_robin_between_equals():
    assert router.choose(states(3, 1, 2), None, slack=4).name == "r1"
    pool = states(0, 0, 0)
    picked = []
    for _ in range(6):  # equally loaded: the one sent the fewest requests so far
        s = router.choose(pool, None, slack=4)
        s.assigned += 1
        picked.append(s.name)
    assert sorted(picked) == ["r0", "r0", "r1", "r1", "r2", "r2"]
    assert router.choose(states(0, 5), None, 4, exclude={"r0"}).name == "r1"
    assert router.choose(states(0), None, 4, exclude={"r0"}) is None


def test_affinity_prefers_one_replica_until_it_is_too_loaded_and_moves_only_its_own_keys():
    pool = states(0, 0, 0, 0)
    keys = [f"user:{i}" for i in range(200)]
    home = {k: router.choose(pool, k, slack=2).name for k in keys}
    assert len(set(home.values())) == 4  # keys spread over every replica
    best = next(s for s in pool if s.name == home["user:0"])
    best.outstanding = 2
    assert router.choose(pool, "user:0", slack=2).name == best.name  # 2 more than the least loaded: still home
    best.outstanding = 3
    assert router.choose(pool, "user:0", slack=2).name != best.name  # 3 more: load wins
    best.outstanding = 0
    gone = "r3"
    rest = [s for s in pool if s.name != gone]
    moved = [k for k in keys if router.choose(rest, k, slack=2).name != home[k]]
    assert moved and all(home[k] == gone for k in moved)  # rendezvous: only the lost replica's keys move


def test_affinity_key_is_the_system_prompt_prefix_else_the_user():
    sys_a = {"messages": [{"role": "system", "content": "You are Grok." + "x" * 300}, {"role": "user", "content": "a"}]}
    sys_b = {"messages": [{"role": "system", "content": [{"type": "text", "text": "You are Grok." + "x" * 300}]},
                          {"role": "user", "content": "b"}]}
    key = router.affinity_key(sys_a, "alice", 200)
    assert key.startswith("prefix:") and key == router.affinity_key(sys_b, "bob", 200)
    other = {"messages": [{"role": "system", "content": "You are Ada."}, {"role": "user", "content": "a"}]}
    assert router.affinity_key(other, "alice", 200) != key
    assert router.affinity_key({"messages": [{"role": "user", "content": "hi"}]}, "alice", 200) == "user:alice"
    assert router.affinity_key({"messages": [{"role": "user", "content": "hi"}]}, None, 200) is None
    assert router.affinity_key({"prompt": "p" * 250}, "u", 200).startswith("prefix:")
    assert router.affinity_key({"prompt": "short"}, "u", 200) == "user:u"


BASE = """
[[replicas]]
url = "http://a:1"
region = "eu"
pool = "v1"
[[replicas]]
url = "http://b:1"
region = "US"
pool = "v1"
[regions.EU]
countries = ["de"]
fallback = "v1"
[regions.US]
fallback = "v1"
"""


def test_region_pools_and_cross_region_failover():
    from gigafactory.gateway.pool import Pool

    cfg = parse_config(BASE)
    assert cfg.region_of("DE") == "EU" and cfg.region_of("eu") == "EU" and cfg.region_of("JP") is None
    pool = Pool(cfg)
    for s in pool.replicas.values():
        s.healthy = True
    assert [s.name for s in pool.candidates("EU", "v1")] == ["a:1"]
    pool.replicas["a:1"].healthy = False
    assert [s.name for s in pool.candidates("EU", "v1")] == ["b:1"]  # EU has none left: borrow the US replica
    strict = Pool(parse_config(BASE + "[routing]\ncross_region = false\n"))
    strict.replicas["b:1"].healthy = True
    assert strict.candidates("EU", "v1") == []


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('pool = "v1"\n[[replicas]]', 'pool = "v1"\nport = 3\n[[replicas]]', 1), "unknown key(s) port"),
    (lambda t: t.replace('url = "http://a:1"', 'url = "a:1"'), "must start with http://"),
    (lambda t: t.replace('[regions.US]\nfallback = "v1"', ""), "has no [regions.US] table"),
    (lambda t: t + '[[regions.EU.phases]]\npool = "v9"\npercent = 5\n', "'v9' is served by no replica"),
    (lambda t: t + '[[regions.EU.phases]]\npool = "v1"\npercent = 50\n[[regions.EU.phases]]\npool = "v1"\npercent = 5\n',
     "percent goes down"),
    (lambda t: t + '[[regions.EU.phases]]\npool = "v1"\nstart = 2030-01-01T00:00:00\n', "needs a time zone"),
    (lambda t: t + "[slo]\nmin_requests = 2.5\n", "slo.min_requests = 2.5 has the wrong type"),
    (lambda t: t + "[slo]\nmax_error_rate = 5\n", "max_error_rate must be a fraction"),
    (lambda t: t + "[slo]\nevaluate_every_s = 0\n", "slo.evaluate_every_s must be > 0"),
    (lambda t: 'default_region = "JP"\n' + t, "default_region 'JP' is not a configured region"),
    (lambda t: 'trusted_proxies = ["10.0.0.0/33"]\n' + t, "is not an IP address or network"),
    (lambda t: t + "[[replicas]]\nurl = \"http://a:1\"\nregion = \"EU\"\npool = \"v1\"\n", "replica names repeat"),
    (lambda t: "x = [", "not valid TOML"),
])
def test_config_errors_are_one_line(edit, message):
    with pytest.raises(UserError) as err:
        parse_config(edit(BASE), "g.toml")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("gateway config g.toml: ")
