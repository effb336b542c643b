"""The HTTP answer for a denial or a fault: the contract's JSON error body."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

import orjson
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion11
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict, CIMultiDictProxy

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
_FIXED_FIELDS = "Content-Type: application/json\r\nServer: shieldproxy\r\n"
_FIXED_LINES = _FIXED_FIELDS.count("\n") + 1  # and Date
# Stand-ins for the date and the request id while a decision's answer is laid out (see
# _Layout): letters and digits, which neither JSON nor a field line escapes, and which no
# decision's own text holds (a layout that finds one twice is not used).
_DATE_MARK = f"date{secrets.token_hex(8)}"
_ID_MARK = f"id{secrets.token_hex(8)}"


class WholeAnswer(web.StreamResponse):
    """A small answer serialised here in full (status line, fields, body) and written at once.

    Why: denials are what a flood is answered with, so they are the one answer whose cost
    bounds how much abuse an instance absorbs. aiohttp's Response builds a header multidict,
    then validates and serialises it field by field on every answer; here the fields are
    one string and the answer one write. aiohttp still owns the connection: keep-alive,
    flow control (the write waits while the client does not read) and closing.
    """

    # Its fields are in `raw`: the header map and the per-response state aiohttp would make
    # for each answer are shared, empty and read-only here, where the base class declares
    # them mutable (on purpose: adding a field to an answer already serialised raises).
    _headers = CIMultiDictProxy(CIMultiDict[str]())  # type: ignore[assignment]
    _state = MappingProxyType[str, Any]({})  # type: ignore[assignment]

    def __init__(self, status: int, raw: bytes, *, keep_alive: bool) -> None:
        # Not StreamResponse.__init__: it would make that header map and state afresh, half
        # of this answer's cost (540 of 1,160 ns for a flood's denial).
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")  # as StreamResponse._set_status
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
    request: BaseRequest,
    status: int,
    fields: bytes,
    lines: int,
    body: bytes,
    *,
    keep_alive: bool,
    made: bytes = b"",
) -> WholeAnswer | None:
    """`fields` (`lines` field lines, each ending in CRLF; no Content-Length or Connection),
    then `made`, and `body` as one WholeAnswer, or None when only aiohttp's Response may send
    them.

    None for a status without a standard reason phrase, and for `fields` holding any CR or
    LF besides the line ends, or another control byte but tab: that came from a name or a
    value (header injection, or bytes a client may read as a line end), and aiohttp's
    Response refuses it. `made` is not looked at: lines this proxy made from parts that are
    safe by construction (its request id, the rendered rate-limit lines, Server, Date), which
    every answer of a limited route carries, and checking them cost as much as the rest.
    """
    line = _STATUS_LINES.get(status)
    if line is None or fields.translate(None, _FIELD_BYTES) != _CRLF * lines:
        return None
    if request.version < (1, 1):
        line = b"HTTP/1.0" + line[8:]
        if keep_alive:
            made += b"Connection: keep-alive\r\n"
    elif not keep_alive:
        made += b"Connection: close\r\n"
    if request.method == "HEAD":
        raw = b"%b%b%bContent-Length: %d\r\n\r\n" % (line, fields, made, len(body))
    else:
        raw = b"%b%b%bContent-Length: %d\r\n\r\n%b" % (line, fields, made, len(body), body)
    return WholeAnswer(status, raw, keep_alive=keep_alive)


def deny_response(ctx: RequestContext, decision: Decision) -> web.StreamResponse:
    """The contract's JSON error body, with the decision's headers."""
    if (layout := laid_out(ctx, decision)) is not None:
        return WholeAnswer(decision.status, layout.raw(ctx.request_id), keep_alive=True)
    request = ctx.request
    request_id = ctx.request_id
    body = _body(decision, request_id)
    status = decision.status
    keep_alive = request.keep_alive and status not in _CLOSE_AFTER
    added = ctx.added_headers() if ctx.response_fields or ctx.response_headers else []
    own, count = _field_lines(request_id, decision, added)
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


@dataclass(frozen=True, slots=True)
class _Layout:
    """A decision's answer to a keep-alive HTTP/1.1 request, as bytes around the two values
    that differ from one answer to the next: the date and the request id.

    Why: a flood is answered with one cached Decision per client and limit (see
    checks.rate_limit), thousands of times a second. Its body, its fields and their check
    (whole_answer's) are the same each time: done once here, an answer costs one join.
    """

    decision: Decision
    head: bytes  # the status line and the fields up to the date
    before_id: bytes  # from the end of the date to the request id
    after_id: bytes  # from the request id to "Content-Length: "
    body_head: bytes  # the JSON body up to the request id...
    body_tail: bytes  # ...and after it

    def raw(self, request_id: str) -> bytes:
        """The whole answer, status line to body."""
        # Generated hex, or a trusted proxy's id matching client_ip._REQUEST_ID: ASCII that
        # JSON does not escape (a test holds that pattern to it).
        rid = request_id.encode("ascii")
        length = len(self.body_head) + len(rid) + len(self.body_tail)
        date = rfc822_formatted_time().encode("ascii")
        return b"".join(
            (
                self.head,
                date,
                self.before_id,
                rid,
                self.after_id,
                b"%d\r\n\r\n" % length,
                self.body_head,
                rid,
                self.body_tail,
            )
        )


# id(decision) -> (decision, its layout or None when it has none), for decisions answered
# more than once; and the decisions answered once so far. Most denials are built per request
# (a missing scope, a fault): they never get past _SEEN, so however many there are, they
# cost no layout and push none of a flood's out. Both are bounded: emptied when full.
_LAYOUTS: dict[int, tuple[Decision, _Layout | None]] = {}
_SEEN: dict[int, Decision] = {}
_MAX_DECISIONS = 4096


def laid_out(ctx: RequestContext, decision: Decision) -> _Layout | None:
    """The denial's layout when it answers this request: a keep-alive HTTP/1.1 request that
    is not HEAD, no field added by a check, a status after which the connection stays open,
    and a decision answered before (floods come this way)."""
    request = ctx.request
    if (
        request.keep_alive
        and decision.status not in _CLOSE_AFTER
        and not (ctx.response_fields or ctx.response_headers)
        and request.version == HttpVersion11
        and request.method != "HEAD"
    ):
        return _layout(decision)
    return None


def _layout(decision: Decision) -> _Layout | None:
    """The decision's layout from its second answer on; None before, or if it has none."""
    key = id(decision)
    entry = _LAYOUTS.get(key)
    if entry is not None and entry[0] is decision:
        return entry[1]
    if _SEEN.get(key) is not decision:
        if len(_SEEN) >= _MAX_DECISIONS:
            _SEEN.clear()
        _SEEN[key] = decision
        return None
    if len(_LAYOUTS) >= _MAX_DECISIONS:
        _LAYOUTS.clear()
    _LAYOUTS[key] = (decision, _lay_out(decision))
    return _LAYOUTS[key][1]


def _lay_out(decision: Decision) -> _Layout | None:
    """The answer deny_response's general path would send to a keep-alive HTTP/1.1 request,
    split at the date and the id; None where that path must decide (a status without a
    reason phrase, or a field that would be refused)."""
    line = _STATUS_LINES.get(decision.status)
    if line is None:
        return None
    own, count = _field_lines(_ID_MARK, decision, [])
    fields = f"{_FIXED_FIELDS}Date: {_DATE_MARK}\r\n{own}Content-Length: ".encode(
        "latin-1", "replace"
    )
    if fields.translate(None, _FIELD_BYTES) != _CRLF * (_FIXED_LINES + count):
        return None
    head, _, rest = fields.partition(_DATE_MARK.encode())
    before_id, *after = rest.split(_ID_MARK.encode())
    body_head, *body_tail = _body(decision, _ID_MARK).split(_ID_MARK.encode())
    if len(after) != 1 or len(body_tail) != 1:
        return None
    return _Layout(decision, line + head, before_id, after[0], body_head, body_tail[0])


def _body(decision: Decision, request_id: str) -> bytes:
    return orjson.dumps(
        {"error": {"code": decision.code, "message": decision.message, "request_id": request_id}}
    )


def _field_lines(
    request_id: str, decision: Decision, added: list[tuple[str, str]]
) -> tuple[str, int]:
    """Header lines in the order of precedence, and how many: the decision's, its Retry-After,
    then what earlier checks added (a later field replaces an earlier one of the same name)."""
    pairs = [("X-Request-Id", request_id), *decision.headers]
    if decision.retry_after is not None:
        pairs.append(("Retry-After", str(decision.retry_after)))
    if decision.status == 401 and not any(
        name.lower() == "www-authenticate" for name, _ in decision.headers
    ):
        pairs.append(("WWW-Authenticate", "Bearer"))
    pairs += added
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
