"""Token quotas a careless operator writes: each is one config error, or works; none fails requests later."""

from __future__ import annotations

import pytest

from gigafactory.errors import UserError
from gigafactory.gateway.config import parse_config
from gigafactory.gateway.quota import TokenLedger, pod_share

BASE = '[[replicas]]\nurl = "http://a"\nregion = "EU"\npool = "v1"\n[regions.EU]\nfallback = "v1"\n'
HUGE = int("9" * 400)  # TOML readers take integers of any length


@pytest.mark.parametrize("window", ["1e-300", "0.5", "1e300", "inf", "nan", "-60"])
def test_a_window_that_is_not_a_sane_number_of_seconds_is_refused(window):
    with pytest.raises(UserError, match="token_quota.window_s"):
        parse_config(f"{BASE}[token_quota]\ntokens = 10\nwindow_s = {window}\n")


def test_huge_limits_shared_over_pods_stay_exact_counts():
    cfg = parse_config(f"pods = 3\n{BASE}[token_quota]\ntokens = {HUGE}\n[token_quota.keys]\nalice = {HUGE}\n")
    ledger = TokenLedger(cfg.token_quota, cfg.pods, clock=lambda: 1e9)
    assert ledger.limit("alice") == ledger.limit("bob") == HUGE // 3  # was OverflowError (int / int -> float)
    ledger.debit("sk", 10**6)
    assert ledger.check("sk", "alice") == 0.0
    assert pod_share(HUGE, 7, whole=True) == HUGE // 7 and pod_share(5, 7, whole=True) == 1


def test_a_replica_answer_nested_past_the_stack_is_charged_the_estimate_not_a_crash():
    from gigafactory.gateway.usage import UsageMeter

    charged = []
    UsageMeter({"model": "m"}, lambda *c: charged.append(c)).read_answer(b"[" * 100_000)
    streamed = UsageMeter({"stream": True}, lambda *c: charged.append(c))
    block = b'data: ' + b"[" * 100_000 + b'"usage"\n\n'
    assert streamed.relay(block) == block  # relayed as sent (the client's problem to read), counted as one chunk
    streamed.settle()
    assert [c[2] for c in charged] == [True, True] and charged[1][1] == 1  # estimates
