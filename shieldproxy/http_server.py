"""aiohttp's low-level server, with protocol errors answered in the contract's JSON.

No router and no middleware: every request on the proxy listener goes to one handler.
`RequestHandler.handle_error` is the one hook aiohttp gives for requests its parser
rejected; it answers them as plain text with status 400, which we turn into 414/431/400
with a JSON body.

Two clocks bound slow clients. aiohttp's `keepalive_timeout` closes a connection that
sends nothing at all (idle between requests, or never starting one); it is long, because
a load balancer in front keeps pooled connections idle for a minute or more. A request
head that starts arriving but does not complete within `header_timeout` (slowloris) gets
a 408 and the connection is closed. That timer is only armed when a packet leaves a head
incomplete, so the common case (a whole head in one packet) costs nothing.

A third bounds slow readers. A client that stops reading (or reads a few bytes a minute)
would otherwise hold its response forever, and with it an upstream connection and whatever
the upstream spends on a streamed answer: a cheap way to exhaust the pool. The transport
tells when its buffer passes the high-water mark (`pause_writing`) and when the client has
taken it back below the low one (`resume_writing`); if `send_timeout` passes in between, the
pending write fails and the connection is aborted, which frees the upstream at once. So a
client must drain what is buffered for it (the 64 KiB high-water mark down to the low one)
within `send_timeout`, and a client that keeps up costs no timer at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import web, web_protocol
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_exceptions import LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader

from shieldproxy.state import RequestIds

if TYPE_CHECKING:
    from shieldproxy.context import RequestContext
    from shieldproxy.decision import Decision
    from shieldproxy.pipeline import PendingRun
    from shieldproxy.state import Runtime

log = logging.getLogger("shieldproxy.http")
# A request decided (or being decided) as its head arrived, for the handler: its context, the
# pipeline's outcome, and the runtime that decided it, which forwards it too (a reload may
# come in between). A tuple: one is made for every request offered and not answered early.
Handover = tuple[
    "RequestContext", "Decision | PendingRun | Coroutine[Any, Any, Decision]", "Runtime"
]
# handler.ProxyHandler.answer_early: the answer's bytes, or the request's handover.
AnswerEarly = Callable[[web.BaseRequest], "bytes | Handover"]


def _status_for(
    exc: BaseException | None, default: int, max_line: int, max_field: int
) -> tuple[int, str, str]:
    if isinstance(exc, LineTooLong):
        if _is_request_line(exc, max_line, max_field):
            return 414, "uri_too_long", "the request line is too long"
        return 431, "headers_too_large", "a request header is too large"
    text = str(exc).lower() if exc is not None else ""
    if "too many headers" in text or ("header" in text and "too large" in text):
        return 431, "headers_too_large", "too many or too large request headers"
    if default == 500:
        return 500, "internal_error", "internal error"
    return default, "bad_request", "malformed HTTP request"


def _is_request_line(exc: LineTooLong, max_line: int, max_field: int) -> bool:
    """aiohttp's LineTooLong says neither which line overflowed nor why: its args are
    (start of the line, the limit it broke). The limit tells when the two differ; when
    they are equal, a request target starts with '/' (or is absolute), a header name never.
    """
    line, limit = exc.args[0], exc.args[1]
    if limit != max_line:
        return False
    if max_line != max_field:
        return True
    start = line.encode("latin-1", "replace") if isinstance(line, str) else bytes(line)
    return start.startswith((b"/", b"http:", b"https:", b"*"))


def _raw_408(request_id: str) -> bytes:
    """A complete 408 answer written straight to the socket: no request object exists."""
    body = orjson.dumps(
        {
            "error": {
                "code": "request_timeout",
                "message": "the request head arrived too slowly",
                "request_id": request_id,
            }
        }
    )
    head = (
        "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
        f"Server: shieldproxy\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _ProtocolHandler(web_protocol.RequestHandler):
    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        send_timeout: float,
        on_client_timeout: Callable[[str], None],
        answer_early: AnswerEarly | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._answer_early = answer_early
        # A request decided as its head arrived and not answered then: start() is to hand it
        # to the handler (ProxyServer.request_for, handler.handed_over).
        self.handover: Handover | None = None
        self._handover_message: object = None  # the message its request was made for
        self._answering = False
        # The last request was denied, its answer leaves the connection open, and start()
        # has taken no request since: the next is likely denied as well (a flood), and is
        # offered to answer_early as its head arrives (expect_denials).
        self.expecting_denials = False
        self._denying = False  # the handler answers the current request with a denial
        self._header_timeout = header_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timeout = send_timeout
        self._send_timer: asyncio.TimerHandle | None = None
        self._on_client_timeout = on_client_timeout
        # aiohttp drops `transport` when it closes a connection, which may happen while
        # writing is paused (the handler done, its last bytes unsent): ours is kept to abort.
        self._open_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._open_transport = cast(asyncio.Transport, transport)  # a stream: it can abort

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self._send_timeout, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_stalled(self) -> None:
        self._send_timer = None
        transport = self._open_transport
        if transport is None:
            return
        log.info("closed a client that did not take its response within %gs", self._send_timeout)
        self._on_client_timeout("send")
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            # On connection_lost(None) aiohttp would let the paused write succeed, and the
            # forwarder would hold the upstream until its next chunk: fail the write now.
            self._drain_waiter = None
            waiter.set_exception(ConnectionResetError("the client stopped reading"))
        transport.abort()  # what it did not take is dropped

    def data_received(self, data: bytes) -> None:
        if (
            not self.expecting_denials
            or self._answering
            or self._messages
            or self._upgraded
            or self._paused  # the client is not reading: answers wait for it, in start()
            or self._close
            or self._force_close
        ):
            self._receive(data)
            return
        # No request is being handled: start() waits for one (parked), or has yet to resume
        # after the denial. aiohttp would wake it for each request this brings; those
        # answered at once (answer_early) never need it.
        waiter = self._waiter
        self._waiter = None
        try:
            super().data_received(data)
            answered = self._answer_queued()
        finally:
            self._waiter = waiter
        if waiter is not None and not waiter.done():
            if self._closing():
                waiter.cancel()  # as close() would have, had start()'s waiter been in place
            elif self._messages:
                waiter.set_result(None)
        self._time_head(answered > 0)

    def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # aiohttp's own coroutine for every answer but a denial: no wrapper on the allow path.
        if self._denying:
            return self._finish_denial(request, resp, start_time)
        return super().finish_response(request, resp, start_time)

    async def _finish_denial(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        answered = await super().finish_response(request, resp, start_time)
        # The denial is written by now (flushed, if writing had paused): a request that
        # arrives before start() resumes may be answered after it, never before.
        self._denying = False
        response, reset = answered
        # Not with requests queued behind it: those are start()'s, in order.
        self.expecting_denials = bool(response.keep_alive) and not reset and not self._messages
        return answered

    def _closing(self) -> bool:
        return self._close or self._force_close

    def _answer_queued(self) -> int:
        """Answer queued requests without a body, in order, for as long as answer_early
        answers them at once; the first it does not is left at the front of the queue for
        start(), with its handover. Returns how many were answered.

        Called with start()'s waiter put aside: reading resumed here (aiohttp pauses it at
        32 queued requests) queues more for this loop, not for start()."""
        answer_early = self._answer_early
        assert answer_early is not None
        messages = self._messages
        loop = self._loop
        answered = 0
        self._answering = True  # what resuming reading parses is queued, not offered
        try:
            while messages and not self._paused:
                message, payload = messages[0]
                transport = self.transport
                if (
                    payload is not EMPTY_PAYLOAD  # a body: start() and the forwarder
                    or isinstance(message, web_protocol._ErrInfo)  # start() answers it
                    or message.upgrade
                    or transport is None
                ):
                    break
                request = web.BaseRequest(
                    message,
                    payload,
                    self,
                    None,  # type: ignore[arg-type]  # start()'s writer if handed over (request_for)
                    self._task_handler,  # type: ignore[arg-type]  # what start() would pass
                    loop,
                )
                answer = answer_early(request)
                if not isinstance(answer, bytes):
                    self.handover = answer
                    self._handover_message = message
                    self.expecting_denials = False
                    break
                messages.popleft()
                if self._parser is not None:
                    self._parser.message_consumed()
                transport.write(answer)
                answered += 1
                if not messages and self._buffer_paused:
                    self._resume_reading_if_drained()  # parses what waits: more to answer
        finally:
            self._answering = False
        if answered:
            # What start() does after each keep-alive answer.
            if self._manager is not None:
                self._manager.requests_count += answered
            self._keepalive = True
            close_time = loop.time() + self._keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = loop.call_at(close_time, self._process_keepalive)
            if self._buffer_paused and len(messages) <= self._msg_queue_resume_size:
                self._resume_reading_if_drained()  # a handover or a body at the front
        return answered

    def early_request(
        self, message: RawRequestMessage, writer: AbstractStreamWriter
    ) -> web.BaseRequest | None:
        """The request made for `message` as it arrived, if it was handed over, now with
        start()'s writer. start() asks as it takes the message: a request is being handled
        from now on."""
        self.expecting_denials = self._denying = False
        handover = self.handover
        if handover is None or self._handover_message is not message:
            return None
        self._handover_message = None
        request = handover[0].request
        # Made without one: an answer written early needs none.
        request._payload_writer = writer
        return request

    def _receive(self, data: bytes) -> None:
        super().data_received(data)
        self._time_head(False)
        # A framing error inside a body (a bad chunk size) makes aiohttp queue an error
        # message but leaves the running request's body stream waiting forever: the
        # forwarder would hold the upstream until body_timeout and answer 408. Hand the
        # error to that stream so the request fails now, as a 400.
        if self._messages and (request := self._current_request) is not None:
            error = self._messages[-1][0]
            if isinstance(error, web_protocol._ErrInfo) and not request.content.is_eof():
                request._cancel(error.exc)

    def _time_head(self, answered: bool) -> None:
        timer = self._head_timer
        if answered or self._messages or self._request_in_progress:
            if timer is not None:
                timer.cancel()
                self._head_timer = None
        elif timer is None and not self._upgraded and not self._force_close:
            # Bytes of a request head arrived but not all of it: start the head clock.
            self._head_timer = self._loop.call_later(self._header_timeout, self._head_too_slow)

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        manager = self._manager
        request_id = manager.error_ids.next() if isinstance(manager, ProxyServer) else "-"
        self.transport.write(_raw_408(request_id))
        self._on_client_timeout("head")
        self.force_close()  # closes the transport after the 408 is flushed

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        self._open_transport = None
        if self.handover is not None:
            # The connection went before start() took the request: an outcome still to be
            # awaited (a PendingRun, a coroutine) never will be.
            close = getattr(self.handover[1], "close", None)
            if close is not None:
                close()
            self.handover = self._handover_message = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 500:
            log.exception("unexpected error answering a request", exc_info=exc)
        else:
            log.debug("rejected malformed request: %s", exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        status, code, text = _status_for(exc, status, self.max_line_size, self.max_field_size)
        # The contract promises a request id on every answer, rejected requests included.
        manager = self._manager
        request_id = manager.error_ids.next() if isinstance(manager, ProxyServer) else "-"
        body = orjson.dumps({"error": {"code": code, "message": text, "request_id": request_id}})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.headers["X-Request-Id"] = request_id
        response.headers["Server"] = "shieldproxy"
        response.force_close()
        return response


def handed_over(request: web.BaseRequest) -> Handover | None:
    """The handover of this request, taken from its connection (see answer_early)."""
    protocol = request.protocol
    if not isinstance(protocol, _ProtocolHandler):
        return None
    handover = protocol.handover
    if handover is None or handover[0].request is not request:
        return None
    protocol.handover = None
    return handover


def expect_denials(request: web.BaseRequest) -> None:
    """The handler answers `request` with a denial: once that answer is written and if it
    keeps the connection open, the connection's next requests are offered to answer_early
    (see _ProtocolHandler.finish_response)."""
    protocol = request.protocol
    if isinstance(protocol, _ProtocolHandler):
        protocol._denying = True


class ProxyServer(web.Server):
    """A web.Server whose connections answer protocol errors as JSON."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        send_timeout: float = 60.0,
        on_client_timeout: Callable[[str], None] = lambda kind: None,
        answer_early: AnswerEarly | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, request_factory=self.request_for, **kwargs)
        self.answer_early = answer_early
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.on_client_timeout = on_client_timeout
        # Ids for requests the parser rejected (the handler never sees them); a separate
        # random prefix keeps them unique next to the handler's.
        self.error_ids = RequestIds()

    def __call__(self) -> web_protocol.RequestHandler:
        return _ProtocolHandler(
            self,
            loop=self._loop,
            header_timeout=self.header_timeout,
            send_timeout=self.send_timeout,
            on_client_timeout=self.on_client_timeout,
            answer_early=self.answer_early,
            **self._kwargs,
        )

    def request_for(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web_protocol.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        """aiohttp's request for a message, unless the protocol made it already (a request
        decided as its head arrived and handed over: handler.handed_over)."""
        if isinstance(protocol, _ProtocolHandler) and (
            request := protocol.early_request(message, writer)
        ):
            return request
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop)


def server_kwargs(
    *,
    max_line: int,
    max_field: int,
    header_timeout: float,
    send_timeout: float,
    idle_timeout: float,
    max_headers: int,
) -> dict[str, Any]:
    return {
        "header_timeout": header_timeout,
        "send_timeout": send_timeout,
        "max_line_size": max_line,
        "max_field_size": max_field,
        "max_headers": max_headers,
        "keepalive_timeout": idle_timeout,
        # A client that hangs up cancels its request: the forwarder closes the upstream
        # connection at once (an AI upstream stops generating for nobody), a concurrency slot
        # is freed, and nothing waits for an answer no one can receive.
        "handler_cancellation": True,
        "lingering_time": 0,
        "access_log": None,
    }
