"""Forward an allowed request to the upstream and stream the answer back.

Headers are filtered once per direction: hop-by-hop fields (RFC 9110 §7.6.1) and any
field the `Connection` header nominates never cross the proxy; forwarding fields the
client could forge are replaced by ours.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import hdrs, web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict
from yarl import URL

from shieldproxy.context import RequestContext
from shieldproxy.errors import (
    BodyIncomplete,
    BodyTimeout,
    BodyTooLarge,
    ClientBodyError,
    UpstreamError,
    UpstreamUnavailable,
)
from shieldproxy.responses import whole_answer
from shieldproxy.upstream import ResponseHead, UpstreamConnection, UpstreamPool

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Request fields we set ourselves, or that claim a client address we did not see.
_REPLACED = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-real-ip",
        b"true-client-ip",
        b"forwarded",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-request-id",
        # Method and path overrides some frameworks honour: they would let a request that
        # passed the checks as one method or path act upstream as another.
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
SKIP_REQUEST = HOP_BY_HOP | _REPLACED
SKIP_RESPONSE = HOP_BY_HOP | {b"content-length"}
_KEY_CARRIERS = {
    "authorization": frozenset({b"authorization", b"x-api-key"}),
    "x-api-key": frozenset({b"x-api-key"}),
    "query": frozenset({b"x-api-key"}),
}
_ALL_KEY_CARRIERS = _KEY_CARRIERS["authorization"]
_NONE: frozenset[bytes] = frozenset()
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})  # nominate nothing: skip parsing
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Fields checks add to forwarded responses (RequestContext.added_headers(): the rate-limit
# headers); only an upstream sending one of these makes replacing necessary.
_CHECK_FIELDS = frozenset(
    {
        b"ratelimit",
        b"ratelimit-policy",
        b"x-ratelimit-limit",
        b"x-ratelimit-remaining",
        b"x-ratelimit-reset",
        b"retry-after",
        b"x-shield-degraded",
    }
)
_SMALL_BODY = 64 * 1024
# Response fields the one-write path must look at (everything else is copied as received).
_NOTED_RESPONSE = SKIP_RESPONSE | _CHECK_FIELDS | {b"x-request-id", b"server", b"date"}


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    max_body_bytes: int
    body_timeout: float
    preserve_host: bool
    charge_header: str = ""  # upstream response header with units to debit after the response


def nominated(values: list[str]) -> frozenset[bytes]:
    """Header names listed in `Connection` (besides the keep-alive/close/upgrade tokens)."""
    tokens = {t.strip().lower() for value in values for t in value.split(",")}
    tokens -= {"", "close", "keep-alive", "upgrade"}
    return frozenset(token.encode("latin-1", "replace") for token in tokens)


def client_headers(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    """The client's headers that may reach the upstream (plain requests and WebSockets)."""
    request = ctx.request
    connection = request.headers.getall(hdrs.CONNECTION, ())
    extra = nominated(connection) if connection else _NONE
    if ctx.key_source:
        # The API key never reaches the upstream; the identity headers replace it.
        carriers = _KEY_CARRIERS.get(ctx.key_source, _ALL_KEY_CARRIERS)
        extra = (extra | carriers) if extra else carriers
    folded = _FOLDED
    kept = []
    for pair in request.raw_headers:
        lname = folded.get(pair[0])
        if lname is None:  # not seen lately, or not one to remember
            if not _strip_request_header(pair[0], extra):
                kept.append(pair)
            _remember(pair[0])
        elif lname and lname not in extra:
            kept.append(pair)
    return kept


# Field names seen lately → their lower-case form, or b"" for a name stripped whatever the
# request (_strip_request_header with nothing nominated). Why: clients send the same few
# names on every request, and deciding each one afresh was most of this function's cost.
# Names with "_" are never remembered (they must be tested twice against what a request
# nominates, see _strip_request_header); the map is bounded, as the names are the client's.
_FOLDED: dict[bytes, bytes] = {}
_FOLDED_MAX = 1024
_FOLDED_NAME_MAX = 64


def _remember(name: bytes) -> None:
    if len(name) > _FOLDED_NAME_MAX or b"_" in name:
        return
    if len(_FOLDED) >= _FOLDED_MAX:
        _FOLDED.clear()
    _FOLDED[name] = b"" if _strip_request_header(name, _NONE) else name.lower()


def _strip_request_header(name: bytes, extra: frozenset[bytes]) -> bool:
    lname = name.lower()
    if lname in SKIP_REQUEST or lname.startswith(b"x-shield-") or lname in extra:
        return True
    if b"_" not in lname:
        return False
    # Underscore spellings (X_Forwarded_For, X_Shield_Key_Id) are read as dashes by some
    # frameworks (CGI/WSGI environ), so they would reach the upstream as the real field.
    dashed = lname.replace(b"_", b"-")
    return dashed in SKIP_REQUEST or dashed.startswith(b"x-shield-") or dashed in extra


def forwarding_headers(ctx: RequestContext) -> list[tuple[str, str]]:
    """What the upstream learns about the client, for plain requests and WebSockets alike.

    From a trusted proxy its chain is kept and the peer appended (as nginx's
    `$proxy_add_x_forwarded_for` does); from anyone else only what we saw ourselves.
    `X-Shield-Client-Ip` carries the address shieldproxy resolved, so the upstream need not
    re-derive it (clients cannot forge `X-Shield-*`: those are stripped on the way in).
    """
    headers = ctx.request.headers
    if ctx.peer_trusted:
        peer = ctx.peer_ip
        chain = ", ".join(headers.getall(hdrs.X_FORWARDED_FOR, ()))
        xff = f"{chain}, {peer}" if chain else peer
        proto = headers.get(hdrs.X_FORWARDED_PROTO, "http")
        host = headers.get(hdrs.X_FORWARDED_HOST) or headers.get(hdrs.HOST) or ""
    else:
        xff, proto, host = ctx.client_ip, "http", headers.get(hdrs.HOST, "")
    return [
        ("X-Forwarded-For", xff),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("X-Request-Id", ctx.request_id),
        ("X-Shield-Client-Ip", ctx.client_ip),
    ]


class Forwarder:
    """Turns one allowed request into one upstream exchange and one client response."""

    def __init__(self, pool: UpstreamPool, upstream_url: URL, settings: ForwardSettings) -> None:
        self.pool = pool
        self.settings = settings
        default_port = 443 if upstream_url.scheme == "https" else 80
        netloc = upstream_url.raw_host or ""
        if upstream_url.port not in (None, default_port):
            netloc = f"{netloc}:{upstream_url.port}"
        self._host_line = f"Host: {netloc}\r\n".encode("latin-1")
        self._base_path = upstream_url.raw_path.rstrip("/")
        self._charge = settings.charge_header.lower().encode("latin-1")
        self._noted = _NOTED_RESPONSE | {self._charge} if self._charge else _NOTED_RESPONSE

    async def forward(self, ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        head = self._request_head(ctx)
        method = request.method
        has_body = request.body_exists
        conn = await self.pool.acquire()
        try:
            response_head = await self._exchange(ctx, conn, head, has_body)
        except UpstreamUnavailable:
            conn.close()
            retry = conn.requests_served > 1 and not conn.received_any
            if not (retry and not has_body and method in _IDEMPOTENT):
                raise
            # A pooled connection the upstream had already closed: one fresh attempt.
            conn = await self.pool.connect()
            try:
                response_head = await self._exchange(ctx, conn, head, has_body)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        try:
            return await self._respond(ctx, conn, response_head)
        finally:
            self.pool.release(conn)

    async def _exchange(
        self, ctx: RequestContext, conn: UpstreamConnection, head: bytes, has_body: bool
    ) -> ResponseHead:
        conn.begin(head_request=ctx.request.method == "HEAD")
        if not has_body:
            conn.write(head)
        else:
            await self._send_body(ctx, conn, head)
        return await conn.response_head()

    def _request_head(self, ctx: RequestContext) -> bytes:
        request = ctx.request
        target = self._base_path + ctx.path
        if ctx.query:
            target = f"{target}?{ctx.query}"
        parts = [f"{request.method} {target} HTTP/1.1\r\n".encode("utf-8", "surrogateescape")]
        for name, value in client_headers(ctx):
            parts += (name, b": ", value, b"\r\n")
        headers = request.headers
        if self.settings.preserve_host and (host := headers.get(hdrs.HOST)):
            parts.append(f"Host: {host}\r\n".encode("latin-1", "replace"))
        else:
            parts.append(self._host_line)
        parts.append(self._forwarding_fields(ctx))
        if request.body_exists:
            length = request.content_length
            if length is not None:
                parts.append(b"Content-Length: %d\r\n" % length)
            else:
                parts.append(b"Transfer-Encoding: chunked\r\n")
        if (key := ctx.key) is not None:
            parts.append(key.identity_lines)  # the caller's identity, in place of its key
        parts.append(b"\r\n")
        return b"".join(parts)

    def _forwarding_fields(self, ctx: RequestContext) -> bytes:
        return "".join(f"{name}: {value}\r\n" for name, value in forwarding_headers(ctx)).encode(
            "latin-1", "replace"
        )

    async def _send_body(self, ctx: RequestContext, conn: UpstreamConnection, head: bytes) -> None:
        request = ctx.request
        content = request.content
        length = request.content_length
        settings = self.settings
        try:
            if length is not None and length <= _SMALL_BODY:
                async with asyncio.timeout(settings.body_timeout):
                    body = await content.readexactly(length)
                conn.write(head + body)
                return
            conn.write(head)
            chunked = length is None
            sent = 0
            while True:
                async with asyncio.timeout(settings.body_timeout):
                    chunk = await content.readany()
                if not chunk:
                    break
                sent += len(chunk)
                if settings.max_body_bytes and sent > settings.max_body_bytes:
                    raise BodyTooLarge(f"request body exceeds {settings.max_body_bytes} bytes")
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await conn.drain()
            if chunked:
                conn.write(b"0\r\n\r\n")
            elif sent != length:
                raise BodyIncomplete("the client sent less than its Content-Length")
        except TimeoutError:
            raise BodyTimeout("request body timeout") from None
        except (HttpProcessingError, asyncio.IncompleteReadError, ConnectionError):
            raise BodyIncomplete("the request body was cut short") from None

    async def _respond(
        self, ctx: RequestContext, conn: UpstreamConnection, head: ResponseHead
    ) -> web.StreamResponse:
        status = head.status
        if conn.complete and status not in (204, 304) and ctx.request.method != "HEAD":
            whole = self._whole(ctx, head, conn)
            if whole is not None:
                return whole
        headers = self._response_headers(ctx, head)
        if conn.complete:
            if ctx.request.method == "HEAD" or status in (204, 304):
                empty = web.Response(status=status, headers=headers)
                if head.content_length is not None and status != 204:
                    empty.headers["Content-Length"] = str(head.content_length)
                return empty
            return web.Response(status=status, headers=headers, body=conn.take_body())
        response = web.StreamResponse(status=status, headers=headers)
        if head.content_length is not None:
            response.content_length = head.content_length
        await response.prepare(ctx.request)
        ctx.sent_status = status
        try:
            while chunk := await conn.read_chunk():
                await response.write(chunk)
        except UpstreamError as exc:
            # Headers are gone already: cut the client connection so it sees a truncated
            # response instead of a clean end.
            ctx.upstream_error = exc
            conn.close()
            transport = ctx.request.transport
            if transport is not None:
                transport.close()
        except ConnectionError:
            # The client went away mid-stream: nothing to answer, nothing to log as an error.
            conn.close()
        return response

    def _whole(
        self, ctx: RequestContext, head: ResponseHead, conn: UpstreamConnection
    ) -> web.StreamResponse | None:
        """A complete upstream answer copied as received, with our fields, in one write.

        Why: the common answer is small and already whole in memory, and aiohttp's Response
        would decode every field to str, keep them in a multidict, then validate and encode
        them again; its cost grows with every field, and a limited route adds five.
        None when a rare case needs `_response_headers` (fields named by `Connection`, an
        upstream sending a field checks set too, an unusual status or suspicious bytes).
        """
        noted = self._noted
        out: list[bytes] = []
        has_server = has_date = False
        for name, value in head.headers:
            lname = name.lower()
            if lname in noted:
                if lname == b"date":
                    has_date = True
                elif lname == b"server":
                    has_server = True
                elif lname == b"connection":
                    if value.lower() not in _PLAIN_CONNECTION:
                        return None
                    continue
                elif lname == self._charge:
                    if value.strip().isdigit():
                        ctx.upstream_charge = int(value)
                elif lname in _CHECK_FIELDS:
                    return None
                else:  # hop-by-hop, Content-Length, X-Request-Id: not copied
                    continue
            out += (name, b": ", value, b"\r\n")
        lines = len(out) // 4
        if added := ctx.response_headers:  # checks' pairs: checked with the upstream's
            out.append("".join([f"{n}: {v}\r\n" for n, v in added]).encode("latin-1", "replace"))
            lines += len(added)
        # Ours, safe by construction: the request id (made here, or matched against a strict
        # pattern), the rate-limit lines ReserveFields renders, Server and Date.
        made = f"X-Request-Id: {ctx.request_id}\r\n{ctx.response_fields}"
        if not has_server:
            made += "Server: shieldproxy\r\n"
        if not has_date:
            made += f"Date: {rfc822_formatted_time()}\r\n"
        return whole_answer(
            ctx.request,
            head.status,
            b"".join(out),
            lines,
            conn.take_body(),
            keep_alive=ctx.request.keep_alive,
            made=made.encode("latin-1", "replace"),
        )

    def _response_headers(self, ctx: RequestContext, head: ResponseHead) -> CIMultiDict[str]:
        extra: frozenset[bytes] = frozenset()
        for name, value in head.headers:
            if (
                len(name) == 10
                and name.lower() == b"connection"
                and value.lower() not in _PLAIN_CONNECTION
            ):
                extra = extra | nominated([value.decode("latin-1")])
        headers: CIMultiDict[str] = CIMultiDict()
        clash = False  # the upstream sent a field that checks may set too
        for name, value in head.headers:
            lname = name.lower()
            if lname not in SKIP_RESPONSE and lname not in extra:
                headers.add(name.decode("latin-1"), value.decode("latin-1"))
                clash = clash or lname in _CHECK_FIELDS
            if lname == self._charge and value.strip().isdigit():
                ctx.upstream_charge = int(value)
        headers["X-Request-Id"] = ctx.request_id
        if ctx.response_fields or ctx.response_headers:
            if clash:
                for name_s, value_s in ctx.added_headers():
                    headers[name_s] = value_s  # ours replace the upstream's
            else:
                headers.extend(ctx.added_headers())
        if "Server" not in headers:
            headers["Server"] = "shieldproxy"
        return headers


__all__ = ["ClientBodyError", "ForwardSettings", "Forwarder", "nominated"]
