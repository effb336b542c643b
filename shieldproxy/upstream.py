"""Pooled HTTP/1.1 connections to the upstream, parsed with httptools.

aiohttp's client spends most of a proxied request's time building per-request objects
(ClientRequest, ClientResponse, timers, cookie and redirect handling) that a proxy does
not use. Here a connection is an asyncio Protocol with an httptools parser that lives as
long as the socket: sending a request is one `transport.write`, the response head arrives
through parser callbacks, and the body is handed out as the bytes arrive, with flow
control both ways. Timeouts are one timer per request, re-armed lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from dataclasses import dataclass

import httptools
from yarl import URL

from shieldproxy.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)

_HIGH_WATER = 256 * 1024  # buffered response bytes before we stop reading the upstream
_LOW_WATER = 64 * 1024


@dataclass(frozen=True, slots=True)
class PoolSettings:
    connect_timeout: float
    read_timeout: float
    max_connections: int
    max_idle: int
    idle_timeout: float


class ResponseHead:
    """Status line and headers of one upstream response, as received (bytes)."""

    __slots__ = ("chunked", "content_length", "headers", "keep_alive", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; serves one request at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.requests_served = 0
        self.idle_since = 0.0
        self._counted = True
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.head: ResponseHead | None = None
        self.complete = False
        self.received_any = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._interim = False
        self._no_body = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self.received_any = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBadResponse("unexpected protocol switch from the upstream"))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(UpstreamBadResponse(f"malformed upstream response: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._counted:
            self._counted = False
            self._pool.forget(self)
        if self.head is not None and not self.complete and self._close_delimited() and exc is None:
            self._finish()  # a body without length or chunking ends with a clean close
        elif not self.complete:
            self._fail(UpstreamUnavailable("the upstream closed the connection", "reset"))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- httptools callbacks ----------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._interim = True  # 100 Continue / 103 Early Hints: wait for the real one
            self._headers = []
            return
        content_length: int | None = None
        chunked = False
        for name, value in self._headers:
            if len(name) == 14 and name.lower() == b"content-length":
                content_length = int(value)
            elif len(name) == 17 and name.lower() == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        keep_alive = self._parser.should_keep_alive()
        if self._no_body and (content_length or chunked):
            # A HEAD answer announcing a body: an upstream that sends it anyway would put
            # those bytes in front of the next response on this connection (a desync that
            # hands one client's bytes to another). HEAD is rare; don't reuse the socket.
            keep_alive = False
        self.head = ResponseHead(status, self._headers, keep_alive, content_length, chunked)
        if self._no_body:
            # httptools cannot be told that a HEAD response has no body: finish here and
            # give the connection a fresh parser before it is reused.
            self._parser = httptools.HttpResponseParser(self)
            self._finish()
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._read_paused and self.transport:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._finish()

    # -- used by the forwarder --------------------------------------------------------

    def begin(self, *, head_request: bool) -> None:
        """Prepare for a new exchange on this (possibly reused) connection."""
        if self.requests_served:
            self._reset_state()
        self.requests_served += 1
        self._no_body = head_request

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamUnavailable("the upstream connection closed", "reset")
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the upstream is not reading; an upstream that stops reading for
        read_timeout is a timeout like one that stops answering."""
        if self._write_paused and not self.closed:
            self._drain_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(self._pool.settings.read_timeout):
                    await self._drain_waiter
            except TimeoutError:
                self.close()
                raise UpstreamTimeout("the upstream stopped reading the request body") from None
            finally:
                self._drain_waiter = None

    async def response_head(self) -> ResponseHead:
        """Wait for the status line and headers; the read timeout starts now."""
        self._arm_timer()
        while self.head is None:
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.head

    async def read_chunk(self) -> bytes:
        """Next body bytes as they arrive; b"" once the body is complete."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        if len(self._chunks) == 1:
            chunk = self._chunks.popleft()
        else:
            chunk = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        return chunk

    def take_body(self) -> bytes:
        """The whole body of a complete response, in one piece."""
        if len(self._chunks) == 1:
            return self._chunks[0]
        return b"".join(self._chunks)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and not self.closed
            and self.head is not None
            and self.head.keep_alive
            and self._error is None
        )

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True

    # -- internals --------------------------------------------------------------------

    def _close_delimited(self) -> bool:
        head = self.head
        return head is not None and head.content_length is None and not head.chunked

    def _finish(self) -> None:
        self.complete = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _arm_timer(self) -> None:
        self._last_activity = self._loop.time()
        if self._timer is None and not self.complete:
            deadline = self._last_activity + self._pool.settings.read_timeout
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        """Fires at most once per read_timeout; re-arms if bytes arrived meanwhile."""
        self._timer = None
        if self.complete or self.closed:
            return
        deadline = self._last_activity + self._pool.settings.read_timeout
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._fail(UpstreamTimeout("no response bytes from the upstream in time"))
        self.close()


class UpstreamPool:
    """Keep-alive connections to one upstream: LIFO reuse, a cap, idle expiry."""

    def __init__(self, url: URL, settings: PoolSettings, loop: asyncio.AbstractEventLoop) -> None:
        if url.host is None:
            raise ValueError(f"upstream URL without a host: {url}")
        self.loop = loop
        self.settings = settings
        self.host: str = url.host
        self.port: int = url.port or (443 if url.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if url.scheme == "https" else None
        )
        self._idle: deque[UpstreamConnection] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.open_connections = 0
        self._closing = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def acquire(self) -> UpstreamConnection:
        now = self.loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.settings.idle_timeout:
                conn.close()
                continue
            return conn
        return await self.connect()

    async def connect(self) -> UpstreamConnection:
        """A new connection, waiting for a free slot while the pool is at its cap."""
        while self.open_connections >= self.settings.max_connections:
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self.settings.connect_timeout):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    # Woken for a free slot, then cancelled (its client hung up) or timed out
                    # before taking it: the slot goes to the next in line, or it is lost.
                    self._wake_waiter()
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout("no free upstream connection in time", "pool") from None
                raise
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if idle := self._take_idle():
                return idle
        self.open_connections += 1
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError:
            self._released_slot()
            raise UpstreamTimeout(
                "connecting to the upstream timed out", "connect_timeout"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            self._released_slot()
            reason = getattr(exc, "strerror", None) or str(exc)
            raise UpstreamUnavailable(
                f"cannot connect to the upstream: {reason}", "connect"
            ) from None
        except BaseException:
            self._released_slot()
            raise
        self._ensure_sweeper()
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Return a finished connection; anything not cleanly reusable is closed."""
        if not conn.reusable or self._closing or len(self._idle) >= self.settings.max_idle:
            conn.close()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_waiter()

    def forget(self, conn: UpstreamConnection) -> None:
        """Called once per connection when its socket is gone."""
        self._released_slot()
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        while self._idle:
            self._idle.pop().close()
        await asyncio.sleep(0)

    def _take_idle(self) -> UpstreamConnection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    def _released_slot(self) -> None:
        self.open_connections -= 1
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and not self._closing:
            self._sweeper = self.loop.call_later(self.settings.idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections past their lifetime so upstream sockets are not held."""
        self._sweeper = None
        cutoff = self.loop.time() - self.settings.idle_timeout
        for conn in [c for c in self._idle if c.idle_since < cutoff]:
            conn.close()
        if self._idle or self.open_connections:
            self._ensure_sweeper()
