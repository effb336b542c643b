"""One canonical path for routing and forwarding; ambiguous targets and methods refused."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.client import get
from tests.fixtures.processes import Proxy, Upstream
from tests.integration.test_protocol_smuggling import (
    assert_error,
    module_proxy,
    one_response,
    parse_responses,
    raw_exchange,
)

ROUTED = """
[auth]
required = false

[[routes]]
name = "chat"
path = "/v1/chat/*"
auth = false
"""


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, ROUTED)


def forwarded_path(proxy: Proxy, target: bytes) -> str:
    data = raw_exchange(
        proxy.port, b"GET %b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % target
    )
    response = one_response(data)
    assert response.status == 200, response.body
    return str(response.json()["path"])


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/v1//items", "/v1/items"),
        (b"//v1///items//", "/v1/items/"),
        (b"/v1/./items", "/v1/items"),
        (b"/v1/items/.", "/v1/items/"),
        (b"/v1/%2e/items", "/v1/items"),
        (b"/v1/%2E%2e/v1/items", "/v1/items"),
        (b"/v1/it%65ms", "/v1/items"),
        (b"/v1/%7Euser/%41", "/v1/~user/A"),
        (b"/v1/a/../items", "/v1/items"),
        (b"/v1/a/b/../../items?x=%2F&y=/../", "/v1/items?x=%2F&y=/../"),
        (b"/v1/caf%c3%a9", "/v1/caf%C3%A9"),
        (b"/v1/a%20b", "/v1/a%20b"),
    ],
)
def test_the_upstream_receives_the_canonical_path(
    routed: Proxy, target: bytes, expected: str
) -> None:
    assert forwarded_path(routed, target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"/v1/a%2Fb",
        b"/v1/a%2fb",
        b"/v1/a%5Cb",
        b"/v1/a%00b",
        b"/v1/a%0Ab",
        b"/v1/a\\b",
        b"/..",
        b"/../etc/passwd",
        b"/v1/../../etc",
        b"/%2e%2e/etc",
        b"/v1/%zz",
        b"/v1/%2",
        b"/v1/%",
        b"/v1/items#fragment",
        b"*",
        b"v1/items",
    ],
)
def test_ambiguous_targets_are_400(routed: Proxy, target: bytes) -> None:
    data = raw_exchange(routed.port, b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    response = one_response(data)
    assert_error(response.status, response.body, 400, "bad_request")


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET http://upstream.internal/v1/items HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT upstream.internal:443 HTTP/1.1\r\nHost: upstream.internal:443\r\n\r\n",
        b"TRACE /v1/items HTTP/1.1\r\nHost: x\r\n\r\n",
        b"TRACK /v1/items HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["absolute-form", "absolute-root", "connect", "trace", "track"],
)
def test_proxy_forms_and_unsafe_methods_are_refused(routed: Proxy, request_head: bytes) -> None:
    # A second request follows on the same connection: it must not be tunnelled or
    # forwarded under the refused one's framing.
    after = b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    data = raw_exchange(routed.port, request_head + after)
    responses = parse_responses(data)
    assert responses, data
    first = responses[0]
    assert first.status in (400, 405), first.body
    assert_error(first.status, first.body, first.status, None)
    assert b'"method": "CONNECT"' not in data and b'"method": "TRACE"' not in data
    assert b"upstream.internal" not in data


def _route_count(proxy: Proxy, route: str) -> float:
    reply = get(
        proxy.admin_port, "/metrics", headers={"Authorization": f"Bearer {proxy.admin_token}"}
    )
    assert reply.status == 200
    pattern = re.compile(r"^shieldproxy_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)
    total = 0.0
    for labels, value in pattern.findall(reply.body.decode()):
        if f'route="{route}"' in labels:
            total += float(value)
    return total


def test_routing_matches_the_canonical_path(routed: Proxy) -> None:
    spellings = [
        b"/v1/chat/x",
        b"//v1//chat/x",
        b"/v1/./chat/x",
        b"/v1/%63hat/x",
        b"/v1/other/../chat/x",
        b"/v1/%2e/chat/x",
    ]
    before = _route_count(routed, "chat")
    for target in spellings:
        assert forwarded_path(routed, target) == "/v1/chat/x"
    assert _route_count(routed, "chat") - before == len(spellings)
