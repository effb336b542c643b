"""Client IP resolution: peer, trusted proxy chains, IPv4-mapped IPv6."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp.test_utils import make_mocked_request

from shieldproxy.checks.client_ip import ClientIpCheck, normalize_ip
from shieldproxy.context import RequestContext


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4 ", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("::FFFF:10.0.0.1", "10.0.0.1"),
        ("[::1]", "::1"),
        ("2001:DB8::0001", "2001:db8::1"),
        ("::1", "::1"),
        ("not-an-ip", None),
        ("1.2.3.4:80", None),
        ("", None),
        ("unknown", None),
    ],
)
def test_normalize_ip(text: str, expected: str | None) -> None:
    assert normalize_ip(text) == expected


def _ctx(
    peer: str, headers: dict[str, str] | list[tuple[str, str]] | None = None
) -> RequestContext:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (peer, 12345) if name == "peername" else default
    )
    request = make_mocked_request("GET", "/", headers=headers or {}, transport=transport)
    return RequestContext(request, "generated-id", 0.0)


def test_untrusted_peer_is_the_client_and_headers_are_ignored() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("203.0.113.5", {"X-Forwarded-For": "1.1.1.1", "X-Request-Id": "spoof"})
    decision = check.decide(ctx)
    assert decision.allowed
    assert ctx.client_ip == "203.0.113.5"
    assert not ctx.peer_trusted
    assert ctx.request_id == "generated-id"


def test_no_trusted_proxies_means_the_peer() -> None:
    ctx = _ctx("127.0.0.1", {"X-Forwarded-For": "1.1.1.1"})
    ClientIpCheck(()).decide(ctx)
    assert ctx.client_ip == "127.0.0.1"


def test_right_most_untrusted_hop_is_the_client() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("10.0.0.2", {"X-Forwarded-For": "6.6.6.6, 198.51.100.7, 10.0.0.9"})
    check.decide(ctx)
    assert ctx.peer_trusted
    assert ctx.client_ip == "198.51.100.7"


def test_several_forwarded_for_fields_are_one_list() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("10.0.0.2", [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.8")])
    check.decide(ctx)
    assert ctx.client_ip == "198.51.100.8"


def test_garbage_hop_stops_the_walk() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("10.0.0.2", {"X-Forwarded-For": "198.51.100.7, garbage, 10.0.0.3"})
    check.decide(ctx)
    assert ctx.client_ip == "10.0.0.3"


def test_all_hops_trusted_gives_the_left_most() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("10.0.0.2", {"X-Forwarded-For": "10.1.1.1, 10.0.0.3"})
    check.decide(ctx)
    assert ctx.client_ip == "10.1.1.1"


def test_mapped_ipv6_peer_and_hops_are_normalised() -> None:
    check = ClientIpCheck(("10.0.0.0/8",))
    ctx = _ctx("::ffff:10.0.0.2", {"X-Forwarded-For": "::ffff:198.51.100.7"})
    check.decide(ctx)
    assert ctx.peer_trusted
    assert ctx.client_ip == "198.51.100.7"


def test_mapped_ipv6_untrusted_peer_is_normalised() -> None:
    ctx = _ctx("::ffff:203.0.113.5")
    ClientIpCheck(()).decide(ctx)
    assert ctx.client_ip == "203.0.113.5"


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("edge-42", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("bad id", False),
        ("x\u00e9", False),
    ],
)
def test_trusted_request_id_is_kept_only_when_well_formed(header: str, kept: bool) -> None:
    ctx = _ctx("10.0.0.2", {"X-Request-Id": header})
    ClientIpCheck(("10.0.0.0/8",)).decide(ctx)
    assert (ctx.request_id == header) is kept
