"""Denials answered as their heads arrive (handler.ProxyHandler.answer_early), end to end.

A flood's denials skip aiohttp's per-request task: the answers must be the same answers,
counted the same, in order with the requests around them, on a connection that behaves as
before (kept alive, closed when idle).
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from tests.client import get
from tests.fixtures.processes import Proxy, Upstream
from tests.integration.test_protocol_smuggling import (
    RawResponse,
    assert_error,
    module_proxy,
    parse_responses,
    read_until_close,
)

CONFIG = """
[auth]
required = false

[server]
keepalive_timeout_seconds = 2

[[routes]]
name = "locked"
path = "/locked/*"
auth = true
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, CONFIG)


def request(path: str, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()


def read_one(sock: socket.socket) -> RawResponse:
    """One response with a Content-Length body from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    assert len(body) == length, "more than one response arrived"
    (response,) = parse_responses(head + b"\r\n\r\n" + body)
    return response


def denials_counted(proxy: Proxy) -> float:
    reply = get(
        proxy.admin_port, "/metrics", headers={"Authorization": f"Bearer {proxy.admin_token}"}
    )
    pattern = (
        r'^shieldproxy_requests_total\{decision="deny",route="locked",status_class="4xx"\} (\S+)$'
    )
    found = re.search(pattern, reply.body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_flood_on_one_connection_is_answered_and_counted_as_before(proxy: Proxy) -> None:
    before = denials_counted(proxy)
    ids = set()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for i in range(300):
            sock.sendall(request(f"/locked/{i}"))
            response = read_one(sock)
            error = assert_error(response.status, response.body, 401, "missing_key")
            assert response.header("X-Request-Id") == error["request_id"]
            assert response.header("WWW-Authenticate") == "Bearer"
            assert response.header("Content-Type") == "application/json"
            assert response.header("Date") and response.header("Server") == "shieldproxy"
            ids.add(error["request_id"])
        # An allowed request on the same connection reaches the upstream.
        sock.sendall(request("/open/after", close=True))
        (last,) = parse_responses(read_until_close(sock, 10))
    assert len(ids) == 300, "every answer has its own request id"
    assert last.status == 200 and b"/open/after" in last.body
    assert denials_counted(proxy) - before == 300


@pytest.mark.parametrize("denied_before", [False, True], ids=["fresh", "after-a-denial"])
def test_pipelined_denials_and_forwards_keep_their_order(proxy: Proxy, denied_before: bool) -> None:
    """Fresh, a connection's requests all go through aiohttp's task; after a denial, those
    arriving while it is idle are decided as they arrive, answered or handed over."""
    paths = ["/locked/a", "/open/1", "/locked/b", "/locked/c", "/open/2", "/locked/d"]
    data = b"".join(request(p) for p in paths) + request("/open/3", close=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        if denied_before:
            sock.sendall(request("/locked/first"))
            assert read_one(sock).status == 401
        sock.sendall(data)
        responses = parse_responses(read_until_close(sock, 10))
    assert [r.status for r in responses] == [401, 200, 401, 401, 200, 401, 200]
    for response, path in zip(responses, [*paths, "/open/3"], strict=True):
        if path.startswith("/open/"):
            assert path.encode() in response.body  # the echo upstream names the path it got
    ids = [r.header("X-Request-Id") for r in responses]
    assert len(set(ids)) == len(ids)


def test_a_connection_answered_early_is_still_closed_when_idle(proxy: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        for i in range(4):  # 3.2 s in all, each answer well within the idle timeout
            sock.sendall(request(f"/locked/idle-{i}"))
            assert read_one(sock).status == 401
            time.sleep(0.8)
        started = time.monotonic() - 0.8
        assert sock.recv(1) == b"", "the proxy closes an idle keep-alive connection"
        assert 1.5 < time.monotonic() - started < 6.0  # keepalive_timeout_seconds = 2


@pytest.mark.parametrize(
    ("second", "expected_status"),
    [
        pytest.param(b"HEAD /locked/h HTTP/1.1\r\nHost: x\r\n\r\n", 401, id="head"),
        pytest.param(b"GET /locked/old HTTP/1.0\r\nHost: x\r\n\r\n", 401, id="http-1.0"),
        pytest.param(
            b"POST /locked/p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            401,
            id="body",
        ),
        pytest.param(
            b"GET /open/up HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            None,
            id="upgrade",
        ),
    ],
)
def test_after_a_denial_other_requests_are_answered_as_ever(
    proxy: Proxy, second: bytes, expected_status: int | None
) -> None:
    """HEAD, HTTP/1.0, a body or an upgrade, arriving while the connection expects denials:
    the same bytes as on a fresh connection (ids and dates aside), and the connection kept
    or closed alike."""

    def exchange(warm: bool) -> tuple[bytes, bool]:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            if warm:
                sock.sendall(request("/locked/first"))
                assert read_one(sock).status == 401
            sock.sendall(second)
            sock.settimeout(1)  # answered by then, and closed if it is to be: idle closes take 2 s
            data = b""
            closed = False
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        closed = True
                        break
                    data += chunk
            except TimeoutError:
                pass
            return data, closed

    fresh, fresh_closed = exchange(warm=False)
    after, after_closed = exchange(warm=True)
    normalise = re.compile(rb"(X-Request-Id: |\"request_id\":\"|Date: )[^\r\n\"]+")
    assert normalise.sub(rb"\1-", after) == normalise.sub(rb"\1-", fresh)
    assert after_closed == fresh_closed
    if expected_status is not None:
        (answer,) = parse_responses(after, head_request=second.startswith(b"HEAD"))
        assert answer.status == expected_status
