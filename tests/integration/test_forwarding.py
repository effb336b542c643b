"""Forwarding through a real `shieldproxy serve` process to a real upstream."""

from __future__ import annotations

from tests.client import get, request
from tests.fixtures.processes import Proxy


def header_values(echo: dict[str, object], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]  # type: ignore[union-attr, misc]


def test_get_is_forwarded_with_forwarding_headers(proxy: Proxy) -> None:
    reply = get(proxy.port, "/v1/items?b=2&a=1")
    assert reply.status == 200
    echo = reply.json()
    assert echo["path"] == "/v1/items?b=2&a=1"
    assert header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert header_values(echo, "X-Forwarded-Proto") == ["http"]
    assert header_values(echo, "X-Forwarded-Host") == [f"127.0.0.1:{proxy.port}"]
    request_id = reply.headers["X-Request-Id"]
    assert request_id and header_values(echo, "X-Request-Id") == [request_id]


def test_post_body_is_forwarded(proxy: Proxy) -> None:
    reply = request(proxy.port, "POST", "/upload", body=b"a" * 100_000)
    assert reply.status == 200
    assert reply.json()["body_length"] == 100_000


def test_upstream_status_and_headers_pass_through(proxy: Proxy) -> None:
    reply = get(proxy.port, "/status/418?X-Custom=teapot")
    assert reply.status == 418
    assert reply.headers["X-Custom"] == "teapot"
