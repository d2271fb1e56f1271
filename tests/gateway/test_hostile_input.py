"""Careless and hostile input to the gateway: a bad config is one UserError line naming the key, a bad body is a
4xx in OpenAI's shape, and neither reaches a replica or takes the gateway down for the next client."""

from __future__ import annotations

import asyncio

import pytest

from gigafactory.errors import UserError
from gigafactory.gateway.config import load_config, parse_config
from tests.gateway.fakes import FakeFleet, gateway_client

REPLICA = '[[replicas]]\nurl = "{url}"\nregion = "EU"\npool = "v1"\n'
REGION = '[regions.EU]\nfallback = "v1"\n'


def config(url="http://eu1", top="", tail=""):
    return top + "\n" + REPLICA.format(url=url) + REGION + tail


@pytest.mark.parametrize("text, named", [
    (config(url="http://"), "replicas[0].url"),
    (config(url="http://h:99999"), "Port out of range"),
    (config(url="http://[::1"), "Invalid IPv6"),
    (config(url="http://ho st:abc"), "not a URL"),
    (config(tail="[health]\ninterval_s = inf\n"), "health.interval_s"),
    (config(tail="[routing]\nread_timeout_s = nan\n"), "routing.read_timeout_s"),
    (config(tail="[health]\npath = \"ready\"\n"), "health.path"),
    (config(top='region_header = "bad header"'), "region_header"),
    (config(top='user_header = ""'), "user_header"),
])
def test_bad_config_is_one_line_naming_the_key(text, named):
    with pytest.raises(UserError) as err:
        parse_config(text, "g.toml")
    assert named in str(err.value) and "\n" not in str(err.value)


def test_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_config(tmp_path)


def test_bodies_json_cannot_carry_are_400_and_the_next_request_is_served():
    """NaN/Infinity (Python's json reads them, no replica could) and deep nesting are the client's 400; a lone
    surrogate in a string is forwarded escaped, as sent."""
    fleet = FakeFleet()

    async def main():
        async with gateway_client(config(), fleet) as (_, client):
            headers = {"X-Region": "EU", "content-type": "application/json"}
            for body, said in ((b'{"messages": [], "temperature": NaN}', "NaN is not a JSON number"),
                               (b'{"max_tokens": -Infinity}', "-Infinity"),
                               (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply")):
                r = await client.post("/v1/chat/completions", content=body, headers=headers)
                assert r.status_code == 400 and said in r.json()["error"]["message"], r.text
            r = await client.post("/v1/chat/completions", headers=headers,
                                  content=b'{"messages": [{"role": "system", "content": "\\ud800 x"}]}')
            assert r.status_code == 200, r.text
        assert len(fleet.served) == 1

    asyncio.run(main())


def test_a_client_gone_mid_body_is_its_own_400_not_a_gateway_error():
    from starlette.requests import Request

    from gigafactory.gateway.app import read_json
    from gigafactory.gateway.proxy import GatewayError

    parts = iter([{"type": "http.request", "body": b'{"model": ', "more_body": True}, {"type": "http.disconnect"}])

    async def receive():
        return next(parts)

    request = Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                       "headers": [(b"content-length", b"1000")]}, receive)
    with pytest.raises(GatewayError) as err:
        asyncio.run(read_json(request))
    assert err.value.status == 400 and err.value.code == "incomplete_body"
