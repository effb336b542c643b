"""Protocol limits answered with clear JSON errors: 414, 431, 413, slow headers, slow body."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.client import client_timeouts, request
from tests.fixtures.processes import Proxy, Upstream
from tests.integration import test_protocol_smuggling as raw
from tests.integration.test_protocol_smuggling import (
    RecordingUpstream,
    assert_error,
    module_proxy,
    one_response,
    raw_exchange,
    read_until_close,
)

recording_upstream = raw.recording_upstream

LIMITS = """
[server]
max_request_line_bytes = 1024
max_header_bytes = 4096
max_header_count = 20
max_body_bytes = 100000
header_timeout_seconds = 1
body_timeout_seconds = 1
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, LIMITS)


@pytest.fixture(scope="module")
def limited_recorded(
    tmp_path_factory: pytest.TempPathFactory, recording_upstream: RecordingUpstream
) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, recording_upstream.url, LIMITS)


def test_request_line_too_long_is_414(limited: Proxy) -> None:
    data = raw_exchange(limited.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    response = one_response(data)
    assert_error(response.status, response.body, 414, "uri_too_long")
    assert response.header("Content-Type") == "application/json"
    assert response.header("X-Request-Id")


def test_long_query_counts_toward_the_request_line(limited: Proxy) -> None:
    data = raw_exchange(limited.port, b"GET /a?q=" + b"b" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    response = one_response(data)
    assert_error(response.status, response.body, 414, "uri_too_long")


def test_request_line_under_the_limit_passes(limited: Proxy) -> None:
    reply = request(limited.port, "GET", "/" + "a" * 900)
    assert reply.status == 200


def test_one_header_too_large_is_431(limited: Proxy) -> None:
    data = raw_exchange(
        limited.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    )
    response = one_response(data)
    assert_error(response.status, response.body, 431, "headers_too_large")


def test_too_many_headers_is_431(limited: Proxy) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(40))
    data = raw_exchange(limited.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    response = one_response(data)
    assert_error(response.status, response.body, 431, "headers_too_large")


def test_headers_too_large_in_total_is_431(limited: Proxy) -> None:
    # Each header is under the per-field cap; together they exceed max_header_bytes.
    headers = b"".join(b"X-H%d: %b\r\n" % (i, b"v" * 900) for i in range(8))
    data = raw_exchange(limited.port, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    response = one_response(data)
    assert_error(response.status, response.body, 431, "headers_too_large")


def test_declared_body_too_large_is_413_without_contacting_upstream(
    limited_recorded: Proxy, recording_upstream: RecordingUpstream
) -> None:
    recording_upstream.reset()
    with socket.create_connection(("127.0.0.1", limited_recorded.port), timeout=3) as sock:
        # Only the head: the proxy must answer without waiting for (or reading) the body.
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100001\r\n\r\n")
        started = time.monotonic()
        data = read_until_close(sock, 3)
    assert time.monotonic() - started < 0.9
    response = one_response(data)
    assert_error(response.status, response.body, 413, "body_too_large")
    assert response.header("Connection") == "close"
    assert recording_upstream.requests == []


def test_declared_body_too_large_with_expect_gets_no_100_continue(limited: Proxy) -> None:
    data = raw_exchange(
        limited.port,
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n"
        b"Expect: 100-continue\r\n\r\n",
        timeout=3,
    )
    assert b"100 Continue" not in data
    response = one_response(data)
    assert_error(response.status, response.body, 413, "body_too_large")


def test_chunked_body_too_large_is_413_while_streaming(
    limited_recorded: Proxy, recording_upstream: RecordingUpstream
) -> None:
    recording_upstream.reset()
    chunk = b"a" * 0x8000
    with socket.create_connection(("127.0.0.1", limited_recorded.port), timeout=5) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            # Far more than the limit, unless the proxy stops us first.
            for _ in range(64):
                sock.sendall(b"8000\r\n" + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass
        data = read_until_close(sock, 3)
    response = one_response(data)
    assert_error(response.status, response.body, 413, "body_too_large")
    # The upstream never received a complete body.
    assert all(len(r.body) <= 100000 for r in recording_upstream.requests)


def test_chunked_body_under_the_limit_passes(limited: Proxy) -> None:
    reply = request(limited.port, "POST", "/upload", body=iter([b"a" * 50000, b"b" * 40000]))
    assert reply.status == 200
    assert reply.json()["body_length"] == 90000


def test_slowloris_headers_are_cut_off(limited: Proxy) -> None:
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40
    with socket.create_connection(("127.0.0.1", limited.port), timeout=3) as sock:
        started = time.monotonic()
        closed_after: float | None = None
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                sock.settimeout(0.3)
                if sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue  # still open: dribble on
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the proxy kept a dribbling connection open"
    assert 0.8 < closed_after < 2.0


def test_slowloris_after_a_keepalive_request_is_cut_off(limited: Proxy) -> None:
    before = client_timeouts(limited.admin_port, limited.admin_token, "head")
    with socket.create_connection(("127.0.0.1", limited.port), timeout=3) as sock:
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(3)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.sendall(b"GET /second HTTP/1.1\r\n")
        data = read_until_close(sock, 3)
    assert time.monotonic() - started < 2.0
    response = one_response(data)  # 408, then the connection is closed
    assert_error(response.status, response.body, 408, "request_timeout")
    assert client_timeouts(limited.admin_port, limited.admin_token, "head") == before + 1


@pytest.mark.parametrize(
    "head",
    [
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\nab",
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ],
    ids=["small", "large", "chunked"],
)
def test_slow_body_is_408(limited: Proxy, head: bytes) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=4) as sock:
        sock.sendall(head)
        started = time.monotonic()
        data = read_until_close(sock, 4)
    elapsed = time.monotonic() - started
    response = one_response(data)
    assert_error(response.status, response.body, 408, "request_timeout")
    assert 0.8 < elapsed < 2.0


def test_client_gone_mid_body_leaves_the_proxy_healthy(limited: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", limited.port), timeout=3) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 90000\r\n\r\n" + b"a" * 70000
        )
    time.sleep(0.2)
    assert request(limited.port, "GET", "/after").status == 200
