"""Upstream failures become fast, clear 502/504 answers; mid-body failures truncate."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.client import get, request
from tests.fixtures.processes import Proxy, Upstream, free_port
from tests.integration import test_protocol_smuggling as raw
from tests.integration.test_protocol_smuggling import (
    Recorded,
    RecordingUpstream,
    assert_error,
    module_proxy,
    read_until_close,
)

recording_upstream = raw.recording_upstream

FAST_TIMEOUTS = """
[upstream]
connect_timeout_seconds = 1
read_timeout_seconds = 1
"""


@pytest.fixture(scope="module")
def proxy_fast(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, FAST_TIMEOUTS)


@pytest.fixture(scope="module")
def proxy_recorded(
    tmp_path_factory: pytest.TempPathFactory, recording_upstream: RecordingUpstream
) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, recording_upstream.url, FAST_TIMEOUTS)


@pytest.fixture(scope="module")
def proxy_to_nothing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, f"http://127.0.0.1:{free_port()}", FAST_TIMEOUTS)


@pytest.fixture
def recorder(recording_upstream: RecordingUpstream) -> Iterator[RecordingUpstream]:
    recording_upstream.reset()
    yield recording_upstream
    recording_upstream.reset()


def timed(call: object) -> tuple[object, float]:
    started = time.monotonic()
    result = call()  # type: ignore[operator]
    return result, time.monotonic() - started


def test_refused_upstream_is_a_fast_502(proxy_to_nothing: Proxy) -> None:
    for method, body in (("GET", None), ("POST", b"x" * 1000)):
        reply, elapsed = timed(
            lambda m=method, b=body: request(proxy_to_nothing.port, m, "/a", body=b)
        )
        assert_error(reply.status, reply.body, 502, "upstream_unavailable")  # type: ignore[attr-defined]
        assert elapsed < 0.5
        assert reply.headers["X-Request-Id"] == reply.json()["error"]["request_id"]  # type: ignore[attr-defined]


def test_silent_upstream_is_a_504_after_the_read_timeout(proxy_fast: Proxy) -> None:
    reply, elapsed = timed(lambda: get(proxy_fast.port, "/slow?seconds=4"))
    assert_error(reply.status, reply.body, 504, "upstream_timeout")  # type: ignore[attr-defined]
    assert 0.9 < elapsed < 1.8


def test_upstream_reset_is_a_502(proxy_fast: Proxy) -> None:
    reply, elapsed = timed(lambda: get(proxy_fast.port, "/reset"))
    assert_error(reply.status, reply.body, 502, "upstream_unavailable")  # type: ignore[attr-defined]
    assert elapsed < 0.5


def test_malformed_upstream_response_is_a_502(proxy_fast: Proxy) -> None:
    reply = get(proxy_fast.port, "/malformed")
    assert_error(reply.status, reply.body, 502, None)
    assert reply.json()["error"]["code"] in ("upstream_bad_response", "upstream_unavailable")


def test_upstream_error_statuses_pass_through_untouched(proxy_fast: Proxy) -> None:
    reply = get(proxy_fast.port, "/status/503?Retry-After=7")
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "7"
    assert reply.body == b"s\n"


def test_proxy_keeps_serving_after_faults(proxy_fast: Proxy) -> None:
    for path in ("/reset", "/malformed", "/reset"):
        get(proxy_fast.port, path)
    assert get(proxy_fast.port, "/fine").status == 200


def _exchange_raw(proxy: Proxy, path: bytes, timeout: float = 4.0) -> tuple[bytes, bool]:
    """The bytes the client got, and whether the proxy closed the connection."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as sock:
        sock.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        started = time.monotonic()
        data = read_until_close(sock, timeout)
        return data, time.monotonic() - started < timeout - 0.5


def test_mid_body_failure_with_content_length_truncates(
    proxy_recorded: Proxy, recorder: RecordingUpstream
) -> None:
    def cut(recorded: Recorded, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        return False

    recorder.behaviour = cut
    data, closed = _exchange_raw(proxy_recorded, b"/cut")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 100000" in head
    assert closed, "the client connection must be closed, not left waiting"
    assert len(body) < 100000


def test_mid_body_failure_when_chunked_truncates(
    proxy_recorded: Proxy, recorder: RecordingUpstream
) -> None:
    def cut(recorded: Recorded, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False

    recorder.behaviour = cut
    data, closed = _exchange_raw(proxy_recorded, b"/cut")
    assert data.startswith(b"HTTP/1.1 200")
    assert closed
    assert b"hello" in data
    assert not data.endswith(b"0\r\n\r\n"), "a truncated body must not end cleanly"


def test_mid_body_silence_truncates_after_the_read_timeout(
    proxy_recorded: Proxy, recorder: RecordingUpstream
) -> None:
    def stall(recorded: Recorded, sock: socket.socket) -> bool:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 10)
        time.sleep(3)
        return False

    recorder.behaviour = stall
    started = time.monotonic()
    data, closed = _exchange_raw(proxy_recorded, b"/stall")
    assert closed
    assert 0.9 < time.monotonic() - started < 2.5
    assert data.startswith(b"HTTP/1.1 200")
    assert len(data.partition(b"\r\n\r\n")[2]) < 100


def _drop_second_request_on_a_connection() -> tuple[dict[socket.socket, int], object]:
    # Keyed by the socket itself, which the dict keeps alive: keyed by id(), a fresh
    # connection's socket could reuse a closed one's id and be taken for it (a flaky 502).
    served: dict[socket.socket, int] = {}

    def behaviour(recorded: Recorded, sock: socket.socket) -> bool:
        count = served.get(sock, 0)
        served[sock] = count + 1
        if count >= 1:
            return False  # the upstream closed its idle keep-alive connection
        body = b"ok"
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)
        return True

    return served, behaviour


def test_stale_pooled_connection_is_retried_for_idempotent_requests(
    proxy_recorded: Proxy, recorder: RecordingUpstream
) -> None:
    _, behaviour = _drop_second_request_on_a_connection()
    recorder.behaviour = behaviour  # type: ignore[assignment]
    assert get(proxy_recorded.port, "/first").status == 200
    reply = get(proxy_recorded.port, "/second")
    assert reply.status == 200
    assert reply.body == b"ok"
    paths = [r.head.split(b" ")[1] for r in recorder.requests]
    assert paths.count(b"/second") == 2  # once on the stale connection, once fresh


def test_stale_pooled_connection_is_not_retried_for_a_post(
    proxy_recorded: Proxy, recorder: RecordingUpstream
) -> None:
    _, behaviour = _drop_second_request_on_a_connection()
    recorder.behaviour = behaviour  # type: ignore[assignment]
    assert get(proxy_recorded.port, "/first").status == 200
    reply = request(proxy_recorded.port, "POST", "/charge", body=b"pay once")
    assert_error(reply.status, reply.body, 502, "upstream_unavailable")
    paths = [r.head.split(b" ")[1] for r in recorder.requests]
    assert paths.count(b"/charge") == 1
