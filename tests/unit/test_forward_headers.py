"""Request and response header filtering in the forwarder (RFC 9110 §7.6.1)."""

from __future__ import annotations

from unittest import mock

from aiohttp.test_utils import make_mocked_request
from yarl import URL

from shieldproxy.context import RequestContext
from shieldproxy.forward import (
    Forwarder,
    ForwardSettings,
    _strip_request_header,
    client_headers,
    nominated,
)
from shieldproxy.upstream import ResponseHead


def _forwarder(url: str = "http://upstream.internal:9000/base/") -> Forwarder:
    settings = ForwardSettings(max_body_bytes=0, body_timeout=1.0, preserve_host=False)
    return Forwarder(mock.Mock(), URL(url), settings)


def _ctx(
    headers: list[tuple[str, str]], path: str = "/v1/items", query: str = ""
) -> RequestContext:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        ("203.0.113.5", 1) if name == "peername" else default
    )
    request = make_mocked_request("GET", path, headers=headers, transport=transport)
    ctx = RequestContext(request, "rid-1", 0.0)
    ctx.path, ctx.query, ctx.client_ip = path, query, "203.0.113.5"
    return ctx


def _head_lines(head: bytes) -> list[str]:
    return head.decode("latin-1").split("\r\n")


def test_nominated_ignores_connection_options_and_lowercases() -> None:
    assert nominated(["close, X-Foo", " keep-alive ,x-BAR", "Upgrade"]) == {b"x-foo", b"x-bar"}
    assert nominated([""]) == frozenset()


def test_strip_request_header() -> None:
    extra = frozenset({b"x-foo"})
    for name in (
        b"Connection",
        b"TE",
        b"Keep-Alive",
        b"X-Forwarded-For",
        b"Forwarded",
        b"X-Real-IP",
        b"True-Client-IP",
        b"X-Shield-Key-Id",
        b"x-foo",
        b"X_Forwarded_For",
        b"X_Real_IP",
        b"X_Shield_Scopes",
        b"X_Foo",
        b"Content-Length",
        b"Host",
        b"Expect",
    ):
        assert _strip_request_header(name, extra), name
    for name in (b"Accept", b"X-Bar", b"Authorization", b"X_Custom_Thing", b"Cookie"):
        assert not _strip_request_header(name, extra), name


def test_request_head_drops_hop_by_hop_and_sets_forwarding_fields() -> None:
    ctx = _ctx(
        [
            ("Host", "api.example.test"),
            ("Connection", "close, X-Foo"),
            ("X-Foo", "nominated"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Shield-Tenant-Id", "forged"),
            ("Accept", "application/json"),
        ],
        query="a=1",
    )
    lines = _head_lines(_forwarder()._request_head(ctx))
    assert lines[0] == "GET /base/v1/items?a=1 HTTP/1.1"
    assert "Accept: application/json" in lines
    assert "Host: upstream.internal:9000" in lines
    assert "X-Forwarded-For: 203.0.113.5" in lines
    assert "X-Forwarded-Proto: http" in lines
    assert "X-Forwarded-Host: api.example.test" in lines
    assert "X-Request-Id: rid-1" in lines
    text = "\r\n".join(lines).lower()
    for gone in ("x-foo", "connection:", "6.6.6.6", "forged"):
        assert gone not in text
    assert lines[-2:] == ["", ""]


def test_response_headers_drop_hop_by_hop_and_nominated() -> None:
    head = ResponseHead(
        200,
        [
            (b"Connection", b"X-Secret"),
            (b"X-Secret", b"hidden"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Content-Length", b"10"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
            (b"X-Kept", b"yes"),
        ],
        True,
        10,
        False,
    )
    headers = _forwarder()._response_headers(_ctx([]), head)
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert headers["X-Kept"] == "yes"
    assert headers["X-Request-Id"] == "rid-1"
    for gone in (
        "Connection",
        "X-Secret",
        "Keep-Alive",
        "Transfer-Encoding",
        "Proxy-Authenticate",
        "Content-Length",
    ):
        assert gone not in headers


def test_client_headers_drop_the_key_and_overrides_for_every_path() -> None:
    """One filter serves plain requests and WebSocket upgrades (a review found the WebSocket
    path forwarding X-API-Key and X_Shield_* spellings)."""
    ctx = _ctx(
        headers={
            "X-API-Key": "sp_live_secret",
            "Authorization": "Bearer sp_live_secret",
            "X_Shield_Key_Id": "key_spoofed",
            "X-HTTP-Method-Override": "DELETE",
            "X-Original-URL": "/admin",
            "Accept": "application/json",
        }
    )
    ctx.key_source = "authorization"
    kept = [name.decode().lower() for name, _ in client_headers(ctx)]
    assert kept == ["accept"]


def test_remembered_names_are_still_filtered_per_request() -> None:
    """client_headers remembers the names it has seen (forward._FOLDED): what one request
    nominates in Connection, or carries its key in, must not decide for the next, in either
    direction, and names past the map's bound are filtered all the same."""

    def kept(headers: dict[str, str], key_source: str = "") -> list[str]:
        ctx = _ctx(headers=headers)
        ctx.key_source = key_source
        return [name.decode() for name, _ in client_headers(ctx)]

    plain = {"Authorization": "Basic dXNlcg==", "X-Foo": "1", "X_Shield_Key_Id": "k"}
    for _ in range(2):  # the second time from the remembered names
        assert kept(plain) == ["Authorization", "X-Foo"]
        nominating = {**plain, "Connection": "X-Foo", "Authorization": "Bearer sp_live_k"}
        assert kept(nominating, "authorization") == []
    many = {f"X-Name-{i}": "v" for i in range(3000)}  # more than it remembers
    for _ in range(2):
        assert kept({**many, "X-Shield-Tenant-Id": "t"}) == list(many)
