"""The shipped nginx front (deploy/nginx/) for real: client → nginx → shieldproxy → upstream.

The client connects from 127.0.0.2 while nginx reaches shieldproxy from 127.0.0.1, so "the
client's address" and "nginx's address" differ and a mix-up between them shows.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.fixtures.nginx import (
    SITE,
    check_config,
    nginx_front_fixture,  # noqa: F401  (registers `nginx_front`)
    render,
)
from tests.fixtures.processes import Proxy

CLIENT_IP = "127.0.0.2"
NGINX_IP = "127.0.0.1"
TRUST_NGINX = '[server]\ntrusted_proxies = ["127.0.0.1/32"]\n'

NginxFront = Callable[[int], Any]
ProxyFactory = Callable[..., Proxy]


def send(
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request to the nginx front from CLIENT_IP."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(CLIENT_IP, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def echo_headers(body: bytes, name: str) -> list[str]:
    echo = json.loads(body)
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def hops(xff: str) -> list[str]:
    return [hop.strip() for hop in xff.split(",")]


def rightmost_untrusted(chain: list[str], trusted: set[str]) -> str:
    """How a consumer of X-Forwarded-For finds the client (the rule shieldproxy applies)."""
    for hop in reversed(chain):
        if hop not in trusted:
            return hop
    return chain[0]


@pytest.fixture
def front(proxy_factory: ProxyFactory, nginx_front: NginxFront) -> Any:
    """nginx in front of a shieldproxy that trusts nginx's address."""
    proxy = proxy_factory(config=TRUST_NGINX)
    return nginx_front(proxy.port)


def test_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    result = check_config(render(tmp_path, shieldproxy_port=18080, listen_port=18081))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_shipped_tls_example_is_valid_once_uncommented(tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed (scripts/test.sh installs it)"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    main = render(tmp_path, shieldproxy_port=18080, listen_port=18081)
    site_path = tmp_path / "shieldproxy.conf"
    site = site_path.read_text()
    tls_start = site.index("# server {")
    block = re.sub(r"(?m)^# ?", "", site[tls_start:])
    block = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", block)
    block = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", block)
    block = block.replace("listen 443 ssl", "listen 127.0.0.1:18443 ssl")
    block = block.replace("listen [::]:443 ssl http2;", "")
    site_path.write_text(site[:tls_start] + block)
    result = check_config(main)
    assert result.returncode == 0, result.stderr


def test_client_address_survives_nginx_and_shieldproxy(front: Any) -> None:
    status, reply_headers, body = send(
        front.port, "/v1/items?a=1", headers={"Host": "api.example.test"}
    )
    assert status == 200, body
    [xff] = echo_headers(body, "X-Forwarded-For")
    # nginx appended the client it saw; shieldproxy (trusting nginx) appended nginx.
    assert hops(xff) == [CLIENT_IP, NGINX_IP]
    assert rightmost_untrusted(hops(xff), {NGINX_IP}) == CLIENT_IP
    assert echo_headers(body, "X-Forwarded-Proto") == ["http"]
    assert echo_headers(body, "X-Forwarded-Host") == ["api.example.test"]
    # One request id across nginx, shieldproxy and the upstream.
    [request_id] = echo_headers(body, "X-Request-Id")
    assert reply_headers["X-Request-Id"] == request_id
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id  # nginx's $request_id


def test_spoofed_forwarded_for_does_not_become_the_client(front: Any) -> None:
    status, _, body = send(
        front.port, "/whoami",
        headers={"X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Forwarded": "for=6.6.6.6"},
    )  # fmt: skip
    assert status == 200, body
    [xff] = echo_headers(body, "X-Forwarded-For")
    chain = hops(xff)
    assert chain == ["6.6.6.6", CLIENT_IP, NGINX_IP]
    assert rightmost_untrusted(chain, {NGINX_IP}) == CLIENT_IP
    assert echo_headers(body, "X-Real-IP") == []
    assert echo_headers(body, "Forwarded") == []


def test_client_request_id_passes_through_a_trusted_front(front: Any) -> None:
    status, headers, body = send(front.port, "/", headers={"X-Request-Id": "trace-42.a"})
    assert status == 200
    assert echo_headers(body, "X-Request-Id") == ["trace-42.a"]
    assert headers["X-Request-Id"] == "trace-42.a"
    # A malformed id is replaced by nginx's own rather than passed on.
    status, _, body = send(front.port, "/", headers={"X-Request-Id": "bad id <script>"})
    [request_id] = echo_headers(body, "X-Request-Id")
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id


def test_without_trusted_proxies_nginx_is_the_client(
    proxy_factory: ProxyFactory, nginx_front: NginxFront
) -> None:
    """The safe default: an empty trusted_proxies ignores X-Forwarded-For from anyone,
    so behind nginx every client is nginx's address until nginx is listed."""
    proxy = proxy_factory()
    nginx = nginx_front(proxy.port)
    status, _, body = send(
        nginx.port, "/", headers={"X-Forwarded-For": "6.6.6.6", "X-Request-Id": "client-id"}
    )
    assert status == 200, body
    assert echo_headers(body, "X-Forwarded-For") == [NGINX_IP]
    [request_id] = echo_headers(body, "X-Request-Id")
    assert request_id != "client-id"  # ids, like addresses, are believed only from trusted peers


def test_request_body_streams_through(front: Any) -> None:
    payload = b"z" * (3 * 1024 * 1024)
    status, _, body = send(front.port, "/upload", method="POST", body=payload)
    assert status == 200, body[:200]
    assert json.loads(body)["body_length"] == len(payload)


def test_server_sent_events_arrive_incrementally(front: Any) -> None:
    conn = http.client.HTTPConnection(
        "127.0.0.1", front.port, timeout=10, source_address=(CLIENT_IP, 0)
    )
    try:
        started = time.monotonic()
        conn.request("GET", "/sse?n=3&delay=0.6")
        response = conn.getresponse()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        arrivals: list[tuple[float, bytes]] = []
        while len(arrivals) < 3:
            line = response.readline()
            assert line, f"stream ended early after {arrivals}"
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic() - started, line.strip()))
        response.read()
    finally:
        conn.close()
    assert [data for _, data in arrivals] == [b"data: event 0", b"data: event 1", b"data: event 2"]
    # Buffered anywhere, the first event would only show up with the last (after ~1.2 s).
    assert arrivals[0][0] < 0.5, arrivals
    assert arrivals[2][0] - arrivals[0][0] > 0.9, arrivals


async def test_websocket_through_nginx(front: Any) -> None:
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_IP, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(
            f"http://127.0.0.1:{front.port}/ws",
            protocols=("chat.v1",),
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        ) as ws,
    ):
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "echo: hello"
        await ws.send_bytes(b"abc")
        assert await ws.receive_bytes(timeout=5) == b"cba"
        await ws.send_str("close")
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert message.data == 4000


async def test_websocket_upstream_sees_resolved_client(
    aiohttp_server: Any, proxy_factory: ProxyFactory, nginx_front: NginxFront
) -> None:
    """shieldproxy sends its resolved client IP (not the chain) on WebSocket upgrades,
    which shows its own decision directly: the spoofed entry must not win."""

    async def handshake_headers(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({k: v for k, v in request.headers.items()})
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handshake_headers)
    server = await aiohttp_server(app)
    proxy = proxy_factory(config=TRUST_NGINX, upstream_url=f"http://127.0.0.1:{server.port}")
    nginx = nginx_front(proxy.port)
    connector = aiohttp.TCPConnector(local_addr=(CLIENT_IP, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.ws_connect(
            f"http://127.0.0.1:{nginx.port}/ws", headers={"X-Forwarded-For": "6.6.6.6"}
        ) as ws,
    ):
        seen = await ws.receive_json(timeout=5)
    assert seen["X-Shield-Client-Ip"] == CLIENT_IP
    # the same chain as plain requests: the spoofed entry is left of the real client
    assert seen["X-Forwarded-For"] == f"6.6.6.6, {CLIENT_IP}, 127.0.0.1"


def test_site_file_is_the_one_rendered() -> None:
    """Guards the fixture: the shipped file keeps its documented defaults."""
    text = SITE.read_text()
    assert "server 127.0.0.1:8080;" in text
    assert "keepalive 64;" in text
    assert "trusted_proxies" in text
