"""Bodies stream both ways without buffering; HEAD/204/304, 100-continue, keep-alive, pipelining."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client import client_timeouts
from tests.fixtures.processes import Proxy, Upstream
from tests.integration.test_protocol_smuggling import (
    echo_header,
    module_proxy,
    parse_responses,
    raw_exchange,
    read_until_close,
)

MB = 1024 * 1024
STREAMING = """
[server]
max_body_bytes = 0
[upstream]
read_timeout_seconds = 1
"""


@pytest.fixture(scope="module")
def streaming(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url, STREAMING)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} missing from /proc/{pid}/status")


def _reset_peak_rss(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM, so the peak measures this transfer alone.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _connection(proxy: Proxy, timeout: float = 20.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=timeout)


def test_large_chunked_upload_streams_without_buffering(streaming: Proxy) -> None:
    pid = streaming.process.pid
    size, piece = 50 * MB, b"u" * (256 * 1024)
    warm = _connection(streaming)
    warm.request("POST", "/warm", body=iter([piece]))
    warm.getresponse().read()
    warm.close()
    before = _status_kb(pid, "VmRSS")
    _reset_peak_rss(pid)

    conn = _connection(streaming)
    conn.request("POST", "/upload", body=(piece for _ in range(size // len(piece))))
    response = conn.getresponse()
    echo = json.loads(response.read())
    conn.close()

    assert response.status == 200
    assert echo["body_length"] == size
    assert echo_header(echo, "Transfer-Encoding") == ["chunked"]
    growth = _status_kb(pid, "VmHWM") - before
    assert growth < 16 * MB, f"proxy RSS grew by {growth / MB:.1f} MB for a 50 MB upload"


def test_large_download_streams_without_buffering(streaming: Proxy) -> None:
    pid = streaming.process.pid
    size = 50 * MB
    before = _status_kb(pid, "VmRSS")
    _reset_peak_rss(pid)
    conn = _connection(streaming)
    conn.request("GET", f"/big?size={size}")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Length") == str(size)
    received = 0
    while chunk := response.read(256 * 1024):
        received += len(chunk)
        time.sleep(0)  # a consumer, not a firehose: let backpressure reach the proxy
    conn.close()
    assert received == size
    growth = _status_kb(pid, "VmHWM") - before
    assert growth < 16 * MB, f"proxy RSS grew by {growth / MB:.1f} MB for a 50 MB download"


def test_slow_reader_gets_the_whole_download(streaming: Proxy) -> None:
    size = 4 * MB
    with socket.create_connection(("127.0.0.1", streaming.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        time.sleep(1.2)  # longer than the upstream read timeout: backpressure is not silence
        data = read_until_close(sock, 10)
    (response,) = parse_responses(data)
    assert response.status == 200
    assert len(response.body) == size


def test_chunked_response_is_relayed(streaming: Proxy) -> None:
    data = raw_exchange(
        streaming.port,
        b"GET /chunked?n=4&delay=0.05 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    (response,) = parse_responses(data)
    assert response.status == 200
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.body == b"part 0\npart 1\npart 2\npart 3\n"


def test_server_sent_events_arrive_incrementally_past_the_read_timeout(streaming: Proxy) -> None:
    """The first event reaches the client long before the upstream finishes, and a
    response that keeps talking outlives the (1 s) read timeout."""
    with socket.create_connection(("127.0.0.1", streaming.port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /sse?n=5&delay=0.4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        first_event_at = None
        while chunk := sock.recv(65536):
            data += chunk
            if first_event_at is None and b"data: event 0" in data:
                first_event_at = time.monotonic() - started
        total = time.monotonic() - started
    assert first_event_at is not None and first_event_at < 0.35
    assert total > 1.5
    (response,) = parse_responses(data)
    assert response.header("Content-Type") == "text/event-stream"
    assert response.body == b"".join(b"data: event %d\n\n" % i for i in range(5))


def test_head_204_and_304_have_no_body_and_keep_the_connection(streaming: Proxy) -> None:
    requests = (
        b"HEAD /big?size=1000000 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/304?ETag=%22v1%22 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    data = raw_exchange(streaming.port, requests)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"Content-Length: 1000000" in head
    responses = parse_responses(rest)
    assert [r.status for r in responses] == [204, 304, 200]
    assert responses[0].header("Content-Length") in (None, "0")
    assert responses[1].header("ETag") == '"v1"'
    assert responses[2].json()["path"] == "/last"


def test_expect_100_continue(streaming: Proxy) -> None:
    with socket.create_connection(("127.0.0.1", streaming.port), timeout=5) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = sock.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        data = read_until_close(sock, 5)
    (response,) = parse_responses(data)
    assert response.status == 200
    echo = response.json()
    assert echo["body_prefix"] == "hello"
    assert echo_header(echo, "Expect") == []


def test_keep_alive_connection_is_reused(streaming: Proxy) -> None:
    conn = _connection(streaming)
    conn.connect()
    first_socket = conn.sock
    for i in range(50):
        method = "POST" if i % 2 else "GET"
        conn.request(method, f"/n/{i}", body=b"b" * i if method == "POST" else None)
        response = conn.getresponse()
        echo = json.loads(response.read())
        assert response.status == 200
        assert echo["path"] == f"/n/{i}"
        assert conn.sock is first_socket, "the proxy closed a keep-alive connection"
    conn.close()


def test_pipelined_requests_are_answered_in_order(streaming: Proxy) -> None:
    requests = b"".join(
        b"POST /p/%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (i, i, b"x" * i)
        if i % 2
        else b"GET /p/%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
        for i in range(8)
    )
    requests += b"GET /p/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    responses = parse_responses(raw_exchange(streaming.port, requests))
    paths = [r.json()["path"] for r in responses]
    assert paths == [f"/p/{i}" for i in range(8)] + ["/p/last"]
    assert [r.json()["body_length"] for r in responses[:8]] == [i if i % 2 else 0 for i in range(8)]
    ids = [r.header("X-Request-Id") for r in responses]
    assert len(set(ids)) == len(ids)


# -- slow readers ---------------------------------------------------------------------------

STALL = """
[server]
send_timeout_seconds = 1
[upstream]
max_connections = 1
"""


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """One upstream connection in all: a client that holds it blocks everybody else."""
    yield from module_proxy(tmp_path_factory, upstream.url, STALL)


def test_a_client_that_stops_reading_is_cut_off_and_frees_the_upstream(one_slot: Proxy) -> None:
    size = 256 * MB
    before = client_timeouts(one_slot.admin_port, one_slot.admin_token, "send")
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=10) as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        stalled.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        time.sleep(0.5)
        # The stalled client holds the only upstream connection: another request waits...
        started = time.monotonic()
        other = _connection(one_slot)
        other.request("GET", "/echo")
        reply = other.getresponse()
        waited = time.monotonic() - started
        # ...until the stalled one is cut, send_timeout after its buffers filled.
        assert reply.status == 200 and reply.read()
        assert 0.1 < waited < 5, waited  # it did wait for the stalled one
        other.close()
        received = len(read_until_close(stalled, 5))
    assert received < size
    assert client_timeouts(one_slot.admin_port, one_slot.admin_token, "send") == before + 1
    assert "did not take its response within 1s" in one_slot.log()


def test_a_slow_reader_that_keeps_taking_bytes_is_served(one_slot: Proxy) -> None:
    size = 640 * 1024
    before = client_timeouts(one_slot.admin_port, one_slot.admin_token, "send")
    with socket.create_connection(("127.0.0.1", one_slot.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.sendall(b"GET /big?size=%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % size)
        chunks: list[bytes] = []
        # A 16 KiB receive buffer emptied every 50 ms: ~320 KiB/s, far slower than the proxy
        # sends, yet ~5x what the 1 s send timeout asks (its 64 KiB buffer drained in 1 s).
        while chunk := sock.recv(64 * 1024):
            chunks.append(chunk)
            time.sleep(0.05)
    (response,) = parse_responses(b"".join(chunks))
    assert response.status == 200 and len(response.body) == size
    assert client_timeouts(one_slot.admin_port, one_slot.admin_token, "send") == before
