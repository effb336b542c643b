"""The send timeout on aiohttp's low-level server: a client that stops reading is cut off,
whatever aiohttp did with the connection meanwhile (closed it, or gave up on keep-alive)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from shieldproxy.http_server import ProxyServer, server_kwargs

pytestmark = pytest.mark.timeout(30)
SEND_TIMEOUT = 0.5


async def _stalled_client(head: str, *, keepalive: float) -> tuple[list[str], asyncio.Transport]:
    """Serve one response that ends with bytes unsent to a client that never reads; return
    the timeouts counted and the server's transport, 3 send timeouts later."""
    seen: dict[str, object] = {}

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel holds little
        response = web.StreamResponse()
        response.content_length = 65536 + 1 + 10000
        await response.prepare(request)
        # Sizes that never make aiohttp wait (it drains only past 64 KiB written since the
        # last drain), yet leave the transport over its high-water mark: the handler ends
        # with writing paused, and aiohttp then closes or keeps the connection by itself.
        for piece in (65536, 1, 10000):
            await response.write(b"x" * piece)
        seen["transport"] = request.transport
        seen["paused"] = request.protocol._paused
        return response

    timeouts: list[str] = []
    kwargs = server_kwargs(
        max_line=8190, max_field=8190, header_timeout=10, send_timeout=SEND_TIMEOUT,
        idle_timeout=keepalive, max_headers=100,
    )  # fmt: skip
    runner = web.ServerRunner(ProxyServer(handler, on_client_timeout=timeouts.append, **kwargs))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            client.connect(("127.0.0.1", port))
            client.sendall(f"GET / HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
            await asyncio.sleep(3 * SEND_TIMEOUT + 1.0)
            transport = seen["transport"]
            assert isinstance(transport, asyncio.Transport)
            assert seen["paused"], "the handler ended before writing paused: not this case"
            return timeouts, transport
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("head", "keepalive"),
    [
        pytest.param("", 30.0, id="keep-alive"),
        pytest.param("Connection: close\r\n", 30.0, id="closed-by-aiohttp"),
        pytest.param("", 0.2, id="keepalive-timeout-first"),
    ],
)
async def test_a_client_that_never_reads_is_cut_off(head: str, keepalive: float) -> None:
    timeouts, transport = await _stalled_client(head, keepalive=keepalive)
    assert timeouts == ["send"]
    assert transport.is_closing() and transport.get_write_buffer_size() == 0


async def test_the_write_waiting_for_a_stalled_client_fails_at_once() -> None:
    """aiohttp lets a paused write succeed when the connection is lost; the forwarder would
    then hold its upstream until the next chunk (a quiet stream: for minutes). It must fail."""
    outcome: list[str] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        response = web.StreamResponse()
        response.content_length = 10 * 65536
        await response.prepare(request)
        started = asyncio.get_running_loop().time()
        try:
            # One write, then (as for a quiet upstream) nothing more to write for a while.
            await response.write(b"x" * 10 * 65536)  # waits: the client's buffers are full
        except ConnectionResetError:
            waited = asyncio.get_running_loop().time() - started
            outcome.append(f"failed after {waited:.1f}s")
            raise
        outcome.append("written")  # the lost connection passed for a drained one
        return response

    kwargs = server_kwargs(
        max_line=8190, max_field=8190, header_timeout=10, send_timeout=SEND_TIMEOUT,
        idle_timeout=30, max_headers=100,
    )  # fmt: skip
    runner = web.ServerRunner(ProxyServer(handler, **kwargs), handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            client.connect(("127.0.0.1", runner.addresses[0][1]))
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(3 * SEND_TIMEOUT + 1.0)
    finally:
        await runner.cleanup()
    assert len(outcome) == 1 and outcome[0].startswith("failed after"), outcome
