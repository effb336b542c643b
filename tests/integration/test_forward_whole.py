"""Complete upstream answers are copied to the client as received, in one write (Forwarder._whole):
every field's bytes kept, hop-by-hop ones dropped, ours added, the connection handled as the
client asked; whatever that path cannot copy faithfully goes through aiohttp's Response."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.processes import Proxy
from tests.integration import test_protocol_smuggling as raw
from tests.integration.test_protocol_smuggling import (
    Recorded,
    RecordingUpstream,
    module_proxy,
)

recording_upstream = raw.recording_upstream

Answer = Callable[[Recorded, socket.socket], bool]


@pytest.fixture(scope="module")
def proxy(
    tmp_path_factory: pytest.TempPathFactory, recording_upstream: RecordingUpstream
) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, recording_upstream.url)


@pytest.fixture
def recorder(recording_upstream: RecordingUpstream) -> Iterator[RecordingUpstream]:
    recording_upstream.reset()
    yield recording_upstream
    recording_upstream.reset()


def answering(head: bytes, body: bytes = b"") -> Answer:
    """An upstream behaviour sending this head (status line and fields, no blank line)."""

    def answer(recorded: Recorded, sock: socket.socket) -> bool:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return True

    return answer


def exchange(proxy: Proxy, data: bytes, *, answers: int = 1) -> tuple[list[bytes], bool]:
    """Send raw request bytes; the answers read (head and body each), and whether the proxy
    then closed the connection (instead of keeping it for another request)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=4) as sock:
        sock.sendall(data)
        received = b""
        out: list[bytes] = []
        sock.settimeout(4)
        while len(out) < answers:
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            head, _, rest = received.partition(b"\r\n\r\n")
            length = int(fields(head).get(b"content-length", [b"0"])[0])
            while len(rest) < length:
                rest += sock.recv(65536)
            out.append(head + b"\r\n\r\n" + rest[:length])
            received = rest[length:]
        return out, _closed(sock)


def _closed(sock: socket.socket) -> bool:
    sock.settimeout(1.0)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def fields(head: bytes) -> dict[bytes, list[bytes]]:
    """Field values by lower-cased name, in order, exactly as sent."""
    out: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return out


GET = b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_fields_reach_the_client_byte_for_byte(proxy: Proxy, recorder: RecordingUpstream) -> None:
    recorder.behaviour = answering(
        b"HTTP/1.1 201 Created\r\n"
        b"X-Bytes: caf\xc3\xa9 \xff\r\n"
        b"Set-Cookie: a=1\r\n"
        b"set-cookie: b=2\r\n"
        b"Content-Type: text/plain\r\n"
        b"X-Request-Id: the-upstreams-own\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Connection: keep-alive\r\n",
        b"\x00binary\xffbody",
    )
    [answer], closed = exchange(proxy, GET)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201 Created\r\n")
    got = fields(head)
    assert got[b"x-bytes"] == [b"caf\xc3\xa9 \xff"]  # not decoded and re-encoded
    assert got[b"set-cookie"] == [b"a=1", b"b=2"]  # both, in order
    assert got[b"content-type"] == [b"text/plain"]
    assert len(got[b"x-request-id"]) == 1 and got[b"x-request-id"] != [b"the-upstreams-own"]
    assert b"keep-alive" not in got  # hop-by-hop
    assert got[b"server"] == [b"shieldproxy"]
    assert len(got[b"date"]) == 1  # the upstream sent none
    assert got[b"content-length"] == [b"%d" % len(body)]
    assert got[b"connection"] == [b"close"]
    assert body == b"\x00binary\xffbody"
    assert closed


def test_the_upstreams_server_and_date_are_kept(proxy: Proxy, recorder: RecordingUpstream) -> None:
    recorder.behaviour = answering(
        b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\nDate: Sat, 21 Nov 2026 10:00:00 GMT\r\n", b"ok"
    )
    [answer], _ = exchange(proxy, GET)
    got = fields(answer.partition(b"\r\n\r\n")[0])
    assert got[b"server"] == [b"upstream/1"]
    assert got[b"date"] == [b"Sat, 21 Nov 2026 10:00:00 GMT"]


def test_keep_alive_serves_the_next_request_on_the_connection(
    proxy: Proxy, recorder: RecordingUpstream
) -> None:
    recorder.behaviour = answering(b"HTTP/1.1 200 OK\r\n", b"one")
    two = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + GET
    answers, closed = exchange(proxy, two, answers=2)
    assert [a.partition(b"\r\n\r\n")[2] for a in answers] == [b"one", b"one"]
    assert b"connection" not in fields(answers[0].partition(b"\r\n\r\n")[0])
    assert closed  # after the second, which asked for close


def test_http10_clients_get_http10_answers(proxy: Proxy, recorder: RecordingUpstream) -> None:
    recorder.behaviour = answering(b"HTTP/1.1 200 OK\r\n", b"ten")
    kept = b"GET /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
    answers, closed = exchange(proxy, kept + b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n", answers=2)
    first, second = (a.partition(b"\r\n\r\n")[0] for a in answers)
    assert first.startswith(b"HTTP/1.0 200 OK\r\n")
    assert fields(first)[b"connection"] == [b"keep-alive"]
    assert second.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"connection" not in fields(second)
    assert closed  # HTTP/1.0 without keep-alive


def test_fields_named_by_connection_are_dropped(proxy: Proxy, recorder: RecordingUpstream) -> None:
    recorder.behaviour = answering(
        b"HTTP/1.1 200 OK\r\nConnection: X-Private, keep-alive\r\nX-Private: secret\r\n"
        b"X-Public: fine\r\n",
        b"ok",
    )
    [answer], _ = exchange(proxy, GET)
    got = fields(answer.partition(b"\r\n\r\n")[0])
    assert b"x-private" not in got
    assert got[b"x-public"] == [b"fine"]


def test_a_status_without_a_reason_phrase_is_still_forwarded(
    proxy: Proxy, recorder: RecordingUpstream
) -> None:
    recorder.behaviour = answering(b"HTTP/1.1 299 Whatever\r\nX-A: 1\r\n", b"odd")
    [answer], _ = exchange(proxy, GET)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 299")
    assert fields(head)[b"x-a"] == [b"1"]
    assert body == b"odd"


@pytest.mark.parametrize(
    "field",
    [b"X-Fold: a\r\n b: injected", b"X-Cr: a\rInjected: 1", b"X-Lf: a\nInjected: 1"],
    ids=["obs-fold", "bare-cr", "bare-lf"],
)
def test_line_breaks_inside_a_field_never_reach_the_client(
    proxy: Proxy, recorder: RecordingUpstream, field: bytes
) -> None:
    """Either the upstream's answer is refused (502) or the field arrives without its break:
    never a field line the upstream did not send as one."""
    recorder.behaviour = answering(b"HTTP/1.1 200 OK\r\n" + field + b"\r\n", b"ok")
    [answer], _ = exchange(proxy, GET)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 502"))
    lines = head.split(b"\r\n")
    assert not any(line.lower().startswith((b"injected", b" b")) for line in lines)
    assert all(b"\r" not in line and b"\n" not in line for line in lines)


def test_empty_statuses_keep_their_framing(proxy: Proxy, recorder: RecordingUpstream) -> None:
    recorder.behaviour = answering(b"HTTP/1.1 204 No Content\r\n")
    [answer], _ = exchange(proxy, GET)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 204")
    assert b"content-length" not in fields(head) or fields(head)[b"content-length"] == [b"0"]
