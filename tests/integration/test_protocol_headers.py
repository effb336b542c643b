"""Header hygiene: hop-by-hop removal both ways, forwarding fields, spoofing, trusted proxies."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client import get
from tests.fixtures.processes import Proxy, Upstream, free_port
from tests.integration.test_protocol_smuggling import (
    NO_AUTH,
    echo_header,
    module_proxy,
    one_response,
    raw_exchange,
)

TRUSTED = """
[server]
trusted_proxies = ["127.0.0.1/32"]
"""


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url)


@pytest.fixture(scope="module")
def behind_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, TRUSTED)


def names(echo: dict[str, object]) -> set[str]:
    return {key.lower() for key, _ in echo["headers"]}  # type: ignore[attr-defined]


def test_hop_by_hop_request_headers_are_removed(plain: Proxy) -> None:
    data = raw_exchange(
        plain.port,
        b"GET /echo HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close, X-Foo\r\nX-Foo: secret\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n"
        b"Upgrade: h2c\r\nX-Bar: kept\r\n\r\n",
    )
    echo = one_response(data).json()
    seen = names(echo)
    for hop in (
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "proxy-authorization",
        "upgrade",
        "transfer-encoding",
    ):
        assert hop not in seen, echo
    assert echo_header(echo, "X-Bar") == ["kept"]


def test_connection_nominated_headers_in_several_fields_are_removed(plain: Proxy) -> None:
    data = raw_exchange(
        plain.port,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: x-one\r\nConnection: close,X-Two \r\n"
        b"X-One: 1\r\nX-Two: 2\r\nX-Three: 3\r\n\r\n",
    )
    echo = one_response(data).json()
    assert "x-one" not in names(echo) and "x-two" not in names(echo)
    assert echo_header(echo, "X-Three") == ["3"]


def test_hop_by_hop_response_headers_are_removed(plain: Proxy) -> None:
    reply = get(plain.port, "/hop")
    assert reply.status == 200
    assert reply.body == b"hop\n"
    for hop in ("X-Secret-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert hop not in reply.headers, dict(reply.headers)
    assert reply.headers.get("Connection") in (None, "keep-alive", "close")
    assert reply.headers["X-Kept"] == "yes"
    assert reply.headers["X-Request-Id"]


def test_forwarding_fields_are_set(plain: Proxy) -> None:
    reply = get(plain.port, "/echo", headers={"Host": "api.example.test"})
    echo = reply.json()
    assert echo_header(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert echo_header(echo, "X-Forwarded-Proto") == ["http"]
    assert echo_header(echo, "X-Forwarded-Host") == ["api.example.test"]
    assert echo_header(echo, "X-Request-Id") == [reply.headers["X-Request-Id"]]
    # The upstream sees its own authority, not the client's.
    assert echo_header(echo, "Host") != ["api.example.test"]


def test_spoofed_client_address_fields_are_stripped(plain: Proxy) -> None:
    spoofed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.test",
        "X-Forwarded-Port": "443",
        "X-Real-IP": "6.6.6.6",
        "True-Client-IP": "6.6.6.6",
        "Forwarded": "for=6.6.6.6;proto=https",
        "X-Client-IP": "6.6.6.6",
        "CF-Connecting-IP": "6.6.6.6",
        "X-Request-Id": "client-chosen-id",
        "X-Shield-Key-Id": "key_forged",
        "X-Shield-Tenant-Id": "tenant_forged",
        "X-Shield-Scopes": "admin",
        "X-Shield-Country": "ZZ",
    }
    reply = get(plain.port, "/echo", headers=spoofed)
    echo = reply.json()
    assert echo_header(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert echo_header(echo, "X-Forwarded-Proto") == ["http"]
    assert echo_header(echo, "X-Forwarded-Host") == [f"127.0.0.1:{plain.port}"]
    for name in (
        "X-Forwarded-Port",
        "X-Real-IP",
        "True-Client-IP",
        "Forwarded",
        "X-Client-IP",
        "CF-Connecting-IP",
        "X-Shield-Key-Id",
        "X-Shield-Tenant-Id",
        "X-Shield-Scopes",
        "X-Shield-Country",
    ):
        assert echo_header(echo, name) == [], name
    assert reply.headers["X-Request-Id"] != "client-chosen-id"
    assert "6.6.6.6" not in reply.body.decode()
    assert "forged" not in reply.body.decode()


def test_underscore_spellings_are_stripped(plain: Proxy) -> None:
    data = raw_exchange(
        plain.port,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
        b"True_Client_IP: 6.6.6.6\r\nX_Shield_Key_Id: forged\r\nX_Request_Id: forged\r\n"
        b"Connection: close\r\n\r\n",
    )
    text = one_response(data).body.decode()
    assert "6.6.6.6" not in text
    assert "forged" not in text
    assert echo_header(one_response(data).json(), "X-Forwarded-For") == ["127.0.0.1"]


def test_trusted_proxy_chain_is_extended_and_request_id_kept(behind_proxy: Proxy) -> None:
    reply = get(
        behind_proxy.port,
        "/echo",
        headers={
            "X-Forwarded-For": "203.0.113.9, 198.51.100.7",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.test",
            "X-Request-Id": "edge-req-42",
            "X-Real-IP": "6.6.6.6",
        },
    )
    echo = reply.json()
    assert echo_header(echo, "X-Forwarded-For") == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
    assert echo_header(echo, "X-Forwarded-Proto") == ["https"]
    assert echo_header(echo, "X-Forwarded-Host") == ["api.example.test"]
    assert echo_header(echo, "X-Request-Id") == ["edge-req-42"]
    assert reply.headers["X-Request-Id"] == "edge-req-42"
    assert echo_header(echo, "X-Real-IP") == []


def test_trusted_proxy_invalid_request_id_is_replaced(behind_proxy: Proxy) -> None:
    reply = get(behind_proxy.port, "/echo", headers={"X-Request-Id": "bad id<script>"})
    assert reply.headers["X-Request-Id"] != "bad id<script>"
    assert echo_header(reply.json(), "X-Request-Id") == [reply.headers["X-Request-Id"]]


def test_trusted_proxy_without_forwarded_for_forwards_the_peer(behind_proxy: Proxy) -> None:
    echo = get(behind_proxy.port, "/echo").json()
    assert echo_header(echo, "X-Forwarded-For") == ["127.0.0.1"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener_forwards_the_ipv6_client(tmp_path: Path, upstream: Upstream) -> None:
    port, admin = free_port(), free_port()
    (tmp_path / "shieldproxy.toml").write_text(NO_AUTH)
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shieldproxy.cli",
                "serve",
                "--config",
                str(tmp_path / "shieldproxy.toml"),
                "--upstream",
                upstream.url,
                "--listen",
                f"[::1]:{port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("::1", port), timeout=0.2):
                    break
            except OSError:
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "IPv6 listener never came up"
                time.sleep(0.05)
        with socket.create_connection(("::1", port), timeout=5) as sock:
            sock.sendall(b"GET /v6 HTTP/1.1\r\nHost: [::1]\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        echo = one_response(data).json()
        assert echo_header(echo, "X-Forwarded-For") == ["::1"]
    finally:
        process.terminate()
        process.wait(10)
    assert "Traceback" not in log_path.read_text()
