"""The HTTP answer for a denial or a fault: the contract's JSON error body."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.web_request import BaseRequest

from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision

# The rest of the request is unread (or, after a refused CONNECT, not HTTP at all).
_CLOSE_AFTER = frozenset({400, 405, 408, 413, 414, 431})
_STATUS_LINES = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii")
    for status in HTTPStatus
}
# Every byte aiohttp's Response allows in a field: all but the control bytes (tab excepted).
# Deleting these from a field block leaves exactly its line ends, CRLF per line, when it is
# sound: one C-speed pass instead of a regex search and two counts.
_FIELD_BYTES = bytes(b for b in range(256) if b == 9 or 32 <= b < 127 or b > 127)
_CRLF = b"\r\n"
# id(decision) -> (decision, its fields as lines, how many): a flood is answered with one
# cached Decision per client and limit, so its fields are rendered once, not per answer.
_RENDERED: dict[int, tuple[Decision, str, int]] = {}
_FIXED_FIELDS = "Content-Type: application/json\r\nServer: shieldproxy\r\n"
_FIXED_LINES = _FIXED_FIELDS.count("\n") + 1  # and Date


class WholeAnswer(web.StreamResponse):
    """A small answer serialised here in full (status line, fields, body) and written at once.

    Why: denials are what a flood is answered with, so they are the one answer whose cost
    bounds how much abuse an instance absorbs. aiohttp's Response builds a header multidict,
    then validates and serialises it field by field on every answer; here the fields are
    one string and the answer one write. aiohttp still owns the connection: keep-alive,
    flow control (the write waits while the client does not read) and closing.
    """

    def __init__(self, status: int, raw: bytes, *, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._raw = raw
        self._keep_alive = keep_alive

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        writer = request.writer
        await writer.write_eof(self._raw)
        self._eof_sent = True
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        return None  # written whole by prepare()


def whole_answer(
    request: BaseRequest, status: int, fields: bytes, lines: int, body: bytes, *, keep_alive: bool
) -> WholeAnswer | None:
    """`fields` (`lines` field lines, each ending in CRLF; no Content-Length or Connection)
    and `body` as one WholeAnswer, or None when only aiohttp's Response may send them.

    None for a status without a standard reason phrase, and for fields holding any CR or LF
    besides the line ends, or another control byte but tab: that came from a name or a value
    (header injection, or bytes a client may read as a line end), and aiohttp's Response
    refuses it.
    """
    line = _STATUS_LINES.get(status)
    if line is None or fields.translate(None, _FIELD_BYTES) != _CRLF * lines:
        return None
    if request.version < (1, 1):
        line = b"HTTP/1.0" + line[8:]
        if keep_alive:
            fields += b"Connection: keep-alive\r\n"
    elif not keep_alive:
        fields += b"Connection: close\r\n"
    if request.method == "HEAD":
        raw = b"%b%bContent-Length: %d\r\n\r\n" % (line, fields, len(body))
    else:
        raw = b"%b%bContent-Length: %d\r\n\r\n%b" % (line, fields, len(body), body)
    return WholeAnswer(status, raw, keep_alive=keep_alive)


def deny_response(ctx: RequestContext, decision: Decision) -> web.StreamResponse:
    """The contract's JSON error body, with the decision's headers."""
    request = ctx.request
    request_id = ctx.request_id
    body = orjson.dumps(
        {"error": {"code": decision.code, "message": decision.message, "request_id": request_id}}
    )
    status = decision.status
    keep_alive = request.keep_alive and status not in _CLOSE_AFTER
    own, count = _field_lines(ctx, decision)
    text = f"{_FIXED_FIELDS}Date: {rfc822_formatted_time()}\r\n{own}"
    answer = whole_answer(
        request,
        status,
        text.encode("latin-1", "replace"),
        _FIXED_LINES + count,
        body,
        keep_alive=keep_alive,
    )
    return answer or _response(ctx, decision, body, keep_alive)


def _rendered(decision: Decision) -> tuple[str, int]:
    """The decision's own fields as header lines, and how many (see _RENDERED)."""
    hit = _RENDERED.get(id(decision))
    if hit is None or hit[0] is not decision:
        if len(_RENDERED) >= 4096:
            _RENDERED.clear()  # one-off decisions (a new client each time) must not pile up
        text = "".join([f"{name}: {value}\r\n" for name, value in decision.headers])
        hit = _RENDERED[id(decision)] = (decision, text, len(decision.headers))
    return hit[1], hit[2]


def _field_lines(ctx: RequestContext, decision: Decision) -> tuple[str, int]:
    """Header lines in the order of precedence, and how many: the decision's, its Retry-After,
    then what earlier checks added (a later field replaces an earlier one of the same name)."""
    extra: list[tuple[str, str]] = []
    if decision.retry_after is not None:
        extra.append(("Retry-After", str(decision.retry_after)))
    if decision.status == 401 and not any(
        name.lower() == "www-authenticate" for name, _ in decision.headers
    ):
        extra.append(("WWW-Authenticate", "Bearer"))
    if ctx.response_fields or ctx.response_headers:
        extra += ctx.added_headers()
    if not extra:  # nothing to merge: the common case, floods included
        own, count = _rendered(decision)
        return f"X-Request-Id: {ctx.request_id}\r\n{own}", count + 1
    pairs = [("X-Request-Id", ctx.request_id), *decision.headers, *extra]
    by_name = {name.lower(): (name, value) for name, value in pairs}
    return "".join([f"{name}: {value}\r\n" for name, value in by_name.values()]), len(by_name)


def _response(
    ctx: RequestContext, decision: Decision, body: bytes, keep_alive: bool
) -> web.Response:
    """The same answer through aiohttp's Response (which validates every field)."""
    response = web.Response(status=decision.status, body=body, content_type="application/json")
    headers = response.headers
    headers["X-Request-Id"] = ctx.request_id
    headers["Server"] = "shieldproxy"
    for name, value in decision.headers:
        headers[name] = value
    if decision.retry_after is not None:
        headers["Retry-After"] = str(decision.retry_after)
    if decision.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    if ctx.response_fields or ctx.response_headers:
        for name, value in ctx.added_headers():
            headers[name] = value
    if not keep_alive:
        response.force_close()
    return response
