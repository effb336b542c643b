"""Requests answered as their heads arrive (ProxyServer's answer_early), on a real socket.

The protocol offers each body-less request that reaches an idle connection to answer_early
before aiohttp makes a task for it: bytes are written at once, anything else is handed over
to the handler, which must see the very request it was decided for, exactly once and in order.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.http_server import (
    Handover,
    ProxyServer,
    expect_denials,
    handed_over,
    server_kwargs,
)
from tests.integration.test_protocol_smuggling import parse_responses, read_until_close

pytestmark = pytest.mark.timeout(60)
DENIAL_BODY = b"d" * 1000  # large enough that a few hundred unread answers pass 64 KiB


def denial(path: str) -> bytes:
    body = path.encode() + DENIAL_BODY
    return b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)


@dataclass
class Server:
    port: int
    early: list[str] = field(default_factory=list)  # paths answered by answer_early
    handled: list[tuple[str, bool]] = field(default_factory=list)  # (path, handed over)
    transports: list[asyncio.Transport] = field(default_factory=list)
    protocols: list[Any] = field(default_factory=list)
    high_water: int | None = None  # the first connection's write buffer limit, if set
    ran: list[str] = field(default_factory=list)  # pending outcomes that ran
    made: list[Coroutine[Any, Any, Decision]] = field(default_factory=list)

    def pending(self) -> Coroutine[Any, Any, Decision]:
        async def wait() -> Decision:
            self.ran.append("pending")
            return ALLOW

        self.made.append(wait())
        return self.made[-1]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    """answer_early denies /deny/*, hands the rest over; the handler answers everything it
    gets (a /deny/* path the same way, so every answer can be told by its bytes, and then
    expects denials on that connection, as the proxy's handler does)."""
    holder: list[Server] = []

    def note_transport(request: web.BaseRequest) -> None:
        if request.transport is not None and not holder[0].transports:
            holder[0].transports.append(request.transport)  # type: ignore[arg-type]
            if holder[0].high_water is not None:
                request.transport.set_write_buffer_limits(high=holder[0].high_water)  # type: ignore[attr-defined]

    def answer_early(request: web.BaseRequest) -> bytes | Handover:
        note_transport(request)
        if request.path.startswith("/deny/"):
            holder[0].early.append(request.path)
            return denial(request.path)
        if request.path == "/pending":  # a check still waiting for the store
            return RequestContext(request, "rid", 0.0), holder[0].pending(), None  # type: ignore[return-value]
        return RequestContext(request, "rid", 0.0), ALLOW, None  # type: ignore[return-value]

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        note_transport(request)
        holder[0].protocols.append(request.protocol)
        handover = handed_over(request)
        holder[0].handled.append((request.path, handover is not None))
        if handover is not None:
            assert handover[0].request is request
            assert handed_over(request) is None, "a handover is taken once"
        if request.path.startswith(("/deny/", "/slow/")):
            expect_denials(request)
            if request.path.startswith("/slow/"):
                await asyncio.sleep(0.3)  # the denial is marked, not yet written
            body = request.path.encode() + DENIAL_BODY
            return web.Response(status=429, body=body)
        return web.Response(text=f"ok {request.path}")

    kwargs = server_kwargs(
        max_line=8190, max_field=8190, header_timeout=10, send_timeout=30,
        idle_timeout=30, max_headers=100,
    )  # fmt: skip
    runner = web.ServerRunner(ProxyServer(handler, answer_early=answer_early, **kwargs))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder.append(Server(runner.addresses[0][1]))
        yield holder[0]
    finally:
        await runner.cleanup()


def get(path: str, *, close: bool = False) -> bytes:
    connection = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{connection}\r\n".encode()


async def exchange(port: int, data: bytes, *, warm: bool = False) -> bytes:
    """Send `data` in one write, then read until the server closes (in a thread: the
    server runs on this loop). `warm`: a denial first, answered before `data` is sent."""

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if warm:
                sock.sendall(get("/deny/warm"))
                read_one(sock)
            sock.sendall(data)
            return read_until_close(sock, 10)

    return await asyncio.to_thread(run)


def read_one(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return int(head.split(b" ")[1]), body


def bodies(data: bytes) -> list[tuple[int, bytes]]:
    return [(r.status, r.body) for r in parse_responses(data)]


async def test_pipelined_requests_are_answered_in_order_each_once(server: Server) -> None:
    paths = ["/deny/1", "/ok/1", "/deny/2", "/ok/2", "/deny/3"]
    data = b"".join(get(p) for p in paths) + get("/ok/3", close=True)
    answers = bodies(await exchange(server.port, data, warm=True))
    assert answers == [
        (429, b"/deny/1" + DENIAL_BODY),
        (200, b"ok /ok/1"),
        (429, b"/deny/2" + DENIAL_BODY),
        (200, b"ok /ok/2"),
        (429, b"/deny/3" + DENIAL_BODY),
        (200, b"ok /ok/3"),
    ]
    handled = [path for path, _ in server.handled]
    assert handled[0] == "/deny/warm" and server.early[0] == "/deny/1"
    assert sorted(server.early + handled[1:]) == sorted([*paths, "/ok/3"]), "each exactly once"
    # /ok/1 was decided as it arrived (after /deny/1, answered early) and handed over.
    assert ("/ok/1", True) in server.handled


async def test_a_connection_that_was_never_denied_is_not_offered_early(server: Server) -> None:
    paths = ["/ok/1", "/deny/1", "/ok/2"]
    data = b"".join(get(p) for p in paths) + get("/ok/3", close=True)
    answers = bodies(await exchange(server.port, data))
    assert [status for status, _ in answers] == [200, 429, 200, 200]
    assert server.early == []
    assert [handed for _, handed in server.handled] == [False] * 4


async def test_denials_on_an_idle_connection_never_reach_the_handler(server: Server) -> None:
    def run() -> list[tuple[int, bytes]]:
        out = []
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            for i in range(100):
                sock.sendall(get(f"/deny/{i}"))
                out.append(read_one(sock))
            sock.sendall(get("/ok/last", close=True))
            out += bodies(read_until_close(sock, 10))
        return out

    answers = await asyncio.to_thread(run)
    assert answers == [(429, f"/deny/{i}".encode() + DENIAL_BODY) for i in range(100)] + [
        (200, b"ok /ok/last")
    ]
    # The first denial is the handler's; it expects more on that connection, and from then
    # on each is answered as it arrives.
    assert server.handled[0] == ("/deny/0", False)
    assert server.early == [f"/deny/{i}" for i in range(1, 100)]
    assert server.handled[-1] == ("/ok/last", True)


async def test_early_answers_stop_while_the_client_does_not_read(server: Server) -> None:
    """Once the write buffer passes its high-water mark, requests wait for start(), which
    waits for the client to read: a client that pipelines bursts and reads nothing cannot
    fill the server's memory with answers."""
    bursts, size = 10, 20  # bursts short of aiohttp's queue limit (32), 1 KB per answer
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        await asyncio.to_thread(sock.sendall, get("/deny/warm"))
        await asyncio.sleep(0.5)  # answered
        transport = server.transports[0]
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=8192, low=0)
        before = len(server.early)
        for burst in range(bursts):
            data = b"".join(get(f"/deny/{burst}-{i}") for i in range(size))
            await asyncio.to_thread(sock.sendall, data)
            await asyncio.sleep(0.1)
        answered = len(server.early) - before
        assert answered >= 1, "nothing was answered early: not this case"
        assert answered <= 2 * size, f"{answered} answered early to a client that reads none"
        buffered = transport.get_write_buffer_size()
        assert buffered < 32 * 1024, f"{buffered} bytes buffered for a client that reads none"
    finally:
        sock.close()


async def test_more_requests_than_aiohttp_queues_at_once_are_all_answered_early(
    server: Server,
) -> None:
    count = 200  # aiohttp parses 32 at a time, and reads no more until they are taken
    # All 200 answers fit the write buffer: were writing to pause (small kernel buffers),
    # the rest would rightly wait for start() and not be answered early.
    server.high_water = 8 * 1024 * 1024
    data = b"".join(get(f"/deny/{i}") for i in range(count)) + get("/ok/end", close=True)
    answers = bodies(await exchange(server.port, data, warm=True))
    expected = [(429, f"/deny/{i}".encode() + DENIAL_BODY) for i in range(count)]
    assert answers == [*expected, (200, b"ok /ok/end")]
    assert server.early == [f"/deny/{i}" for i in range(count)]


async def test_a_denial_not_yet_written_is_never_overtaken(server: Server) -> None:
    """The handler marks its denial, then yields before it is written: a request arriving
    meanwhile waits for start(), and is answered after it."""

    def run() -> list[tuple[int, bytes]]:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(get("/deny/warm"))
            read_one(sock)
            sock.sendall(get("/slow/1"))
            time.sleep(0.1)  # the handler sleeps with its denial marked
            sock.sendall(get("/deny/next") + get("/ok/end", close=True))
            return bodies(read_until_close(sock, 10))

    answers = await asyncio.to_thread(run)
    assert [body[:10] for _, body in answers] == [
        b"/slow/1" + b"d" * 3,
        b"/deny/next",
        b"ok /ok/end",
    ]


async def test_a_handover_its_connection_outlived_is_closed_not_left_unawaited(
    server: Server,
) -> None:
    def warm() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(get("/deny/warm"))
        read_one(sock)
        return sock

    sock = await asyncio.to_thread(warm)
    try:
        protocol = server.protocols[-1]
        await asyncio.sleep(0.1)  # start() waits for the next request
        protocol.data_received(get("/pending"))  # decided at once: a check still waits
        assert protocol.handover is not None and len(server.made) == 1
        protocol.connection_lost(None)  # before start() could take it
        assert protocol.handover is None
        assert server.made[0].cr_frame is None, "closed"
        await asyncio.sleep(0.1)
        assert server.ran == [] and [p for p, _ in server.handled] == ["/deny/warm"]
    finally:
        sock.close()
