"""Request smuggling on raw sockets: ambiguous framing is refused, never forwarded twice.

This module also holds the raw-socket helpers the other `test_protocol_*` modules share:
a client that can misbehave (`raw_exchange`), a parser for what came back, and a
recording upstream that shows exactly which requests crossed the proxy.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.processes import Proxy, start_proxy

# -- shared helpers ------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


def raw_exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes as they are, half-close, and read until the proxy closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_close(sock, timeout)


def read_until_close(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def exchange_one(port: int, data: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send bytes and return the first complete response, without waiting for a close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            try:
                return parse_responses(received)[0]
            except (AssertionError, ValueError, IndexError):
                continue
    return one_response(received)


def parse_responses(data: bytes, *, head_request: bool = False) -> list[RawResponse]:
    """Split a byte stream into HTTP/1.x responses (Content-Length or chunked bodies)."""
    responses: list[RawResponse] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        response = RawResponse(status, headers, b"")  # type: ignore[arg-type]
        length = response.header("Content-Length")
        if status in (100, 101):
            data = rest
            if status == 100:
                continue
        if head_request or status in (204, 304):
            body, data = b"", rest
        elif (response.header("Transfer-Encoding") or "").lower() == "chunked":
            body, data = _dechunk(rest)
        elif length is not None:
            body, data = rest[: int(length)], rest[int(length) :]
            assert len(body) == int(length), "truncated body"
        else:
            body, data = rest, b""
        response.body = body
        responses.append(response)
    return responses


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        assert sep, "truncated chunked body"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, sep, data = data.partition(b"\r\n")
            return bytes(body), data
        body += data[:size]
        assert len(data) >= size + 2, "truncated chunk"
        data = data[size + 2 :]


def one_response(data: bytes) -> RawResponse:
    responses = parse_responses(data)
    assert len(responses) == 1, f"expected exactly one response, got {data!r}"
    return responses[0]


def assert_error(
    status: int, body: bytes | Any, expected_status: int, code: str | None
) -> dict[str, Any]:
    """The contract's error shape: {"error": {"code", "message", "request_id"}}."""
    assert status == expected_status, body
    payload = json.loads(body) if isinstance(body, bytes | str) else body
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"code", "message", "request_id"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["request_id"], str) and error["request_id"]
    if code is not None:
        assert error["code"] == code, error
    return error  # type: ignore[no-any-return]


def echo_header(echo: dict[str, Any], name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


@dataclass
class Recorded:
    head: bytes
    body: bytes


@dataclass
class RecordingUpstream:
    """A tiny threaded HTTP/1.1 upstream that records every request it parses.

    `behaviour(recorded, sock)` answers one request; the default is `200 ok`, keep-alive.
    It returns False to close the connection afterwards.
    """

    port: int
    server: socketserver.ThreadingTCPServer
    requests: list[Recorded] = field(default_factory=list)
    connections: int = 0
    behaviour: Callable[[Recorded, socket.socket], bool] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.requests.clear()
        self.connections = 0
        self.behaviour = None


def ok_response(recorded: Recorded, sock: socket.socket) -> bool:
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def _read_head(reader: Any) -> bytes | None:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline(65536)
        if not line:
            return None
        head += line
    return head


def _read_body(reader: Any, head: bytes) -> bytes:
    lowered = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lowered:
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            body += reader.read(size + 2)[:size]
            if size == 0:
                return body
    for line in lowered.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            body = reader.read(int(line.split(b":")[1]))
    return body


@pytest.fixture(scope="session")
def recording_upstream() -> Iterator[RecordingUpstream]:
    holder: list[RecordingUpstream] = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            upstream = holder[0]
            upstream.connections += 1
            while True:
                try:
                    head = _read_head(self.rfile)
                    if head is None:
                        return
                    # Recorded as soon as the head arrives: a half-sent request counts too.
                    recorded = Recorded(head, b"")
                    upstream.requests.append(recorded)
                    recorded.body = _read_body(self.rfile, head)
                except (OSError, ValueError):
                    return
                behaviour = upstream.behaviour or ok_response
                try:
                    if not behaviour(recorded, self.connection):
                        return
                except OSError:
                    return

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(RecordingUpstream(server.server_address[1], server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()


NO_AUTH = "[auth]\nrequired = false\n"


def module_proxy(
    tmp_path_factory: pytest.TempPathFactory, upstream_url: str, config: str = ""
) -> Iterator[Proxy]:
    """A proxy shared by one module; its log must never show a traceback."""
    directory: Path = tmp_path_factory.mktemp("proxy")
    if "[auth]" not in config:
        config = NO_AUTH + config  # protocol tests run without API keys
    proxy = start_proxy(directory, upstream_url, config=config)
    yield proxy
    proxy.stop()
    assert "Traceback" not in proxy.log(), proxy.log()


# -- smuggling tests ---------------------------------------------------------------------------

STRICT = """
[server]
max_body_bytes = 100000
body_timeout_seconds = 1
header_timeout_seconds = 2
"""


@pytest.fixture(scope="module")
def smuggling_proxy(
    tmp_path_factory: pytest.TempPathFactory, recording_upstream: RecordingUpstream
) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, recording_upstream.url, STRICT)


@pytest.fixture
def recorder(recording_upstream: RecordingUpstream) -> RecordingUpstream:
    recording_upstream.reset()
    return recording_upstream


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

CASES = {
    "cl_and_te": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_and_cl": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 40\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "duplicate_content_length": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    b"Content-Length: 35\r\n\r\n" + SMUGGLED,
    "content_length_list": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 35\r\n\r\n"
    + SMUGGLED,
    "content_length_plus": b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +35\r\n\r\n" + SMUGGLED,
    "te_chunked_identity": b"POST /a HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "te_not_chunked": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "te_duplicated": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "obs_fold_te": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "obs_fold": b"GET /a HTTP/1.1\r\nHost: x\r\nX-Folded: one\r\n two\r\n\r\n" + SMUGGLED,
    "bare_lf": b"GET /a HTTP/1.1\nHost: x\n\n" + SMUGGLED,
    "bare_lf_in_headers": b"GET /a HTTP/1.1\r\nHost: x\nX-B: 1\r\n\r\n" + SMUGGLED,
    "bare_cr": b"GET /a HTTP/1.1\r\nHost: x\rX-B: 1\r\n\r\n" + SMUGGLED,
    "space_before_colon": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\n" + SMUGGLED,
    "chunk_size_not_hex": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_size_negative": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"-1\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_size_overflow": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"10000000000000003\r\nabc\r\n0\r\n\r\n" + SMUGGLED,
    "chunk_without_crlf": b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabcX0\r\n\r\n" + SMUGGLED,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ambiguous_framing_is_refused(
    smuggling_proxy: Proxy, recorder: RecordingUpstream, name: str
) -> None:
    data = raw_exchange(smuggling_proxy.port, CASES[name], timeout=3)
    responses = parse_responses(data)
    assert len(responses) == 1, f"{name}: the proxy answered {data!r}"
    assert_error(responses[0].status, responses[0].body, 400, None)
    # The upstream saw at most the start of the first request, never the smuggled one.
    assert len(recorder.requests) <= 1, recorder.requests
    assert all(b"/smuggled" not in r.head for r in recorder.requests), recorder.requests


def test_chunk_error_in_a_later_packet_is_400_and_not_forwarded_twice(
    smuggling_proxy: Proxy, recorder: RecordingUpstream
) -> None:
    with socket.create_connection(("127.0.0.1", smuggling_proxy.port), timeout=3) as sock:
        sock.sendall(
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        time.sleep(0.2)  # the proxy is streaming the body by now
        sock.sendall(b"zz\r\nxyz\r\n0\r\n\r\n" + SMUGGLED)
        data = read_until_close(sock, 3)
    response = one_response(data)
    assert_error(response.status, response.body, 400, None)
    assert len(recorder.requests) <= 1
    assert all(b"/smuggled" not in r.head for r in recorder.requests)


def test_valid_pipelined_requests_reach_the_upstream_once_each(
    smuggling_proxy: Proxy, recorder: RecordingUpstream
) -> None:
    data = raw_exchange(
        smuggling_proxy.port,
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /two HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert [r.status for r in parse_responses(data)] == [200, 200, 200]
    lines = [r.head.split(b"\r\n", 1)[0] for r in recorder.requests]
    assert lines == [b"POST /one HTTP/1.1", b"POST /two HTTP/1.1", b"GET /three HTTP/1.1"]
    assert [r.body for r in recorder.requests] == [b"hello", b"abc", b""]


def test_content_length_body_is_not_reparsed_as_a_request(
    smuggling_proxy: Proxy, recorder: RecordingUpstream
) -> None:
    # A body that looks like a request is payload, forwarded as such and only once.
    data = raw_exchange(
        smuggling_proxy.port,
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%b"
        % (len(SMUGGLED), SMUGGLED),
    )
    assert one_response(data).status == 200
    assert len(recorder.requests) == 1
    assert recorder.requests[0].body == SMUGGLED


def test_upstream_request_framing_is_regenerated(
    smuggling_proxy: Proxy, recorder: RecordingUpstream
) -> None:
    """One framing header to the upstream, written by the proxy, never copied."""
    raw_exchange(
        smuggling_proxy.port,
        b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    (request,) = recorder.requests
    head = request.head.lower()
    assert head.count(b"transfer-encoding:") == 1
    assert b"content-length:" not in head
    assert request.body == b"abc"
