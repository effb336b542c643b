"""aiohttp's low-level server, with protocol errors answered in the contract's JSON.

No router and no middleware: every request on the proxy listener goes to one handler.
`RequestHandler.handle_error` is the one hook aiohttp gives for requests its parser
rejected; it answers them as plain text with status 400, which we turn into 414/431/400
with a JSON body. Slow clients are bounded by `keepalive_timeout`, which aiohttp arms
when a connection opens and after each response, and which closes a connection that has
not completed a request head in time (slowloris).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web, web_protocol
from aiohttp.http_exceptions import LineTooLong

log = logging.getLogger("shieldproxy.http")


def _status_for(exc: BaseException | None, default: int) -> tuple[int, str, str]:
    if isinstance(exc, LineTooLong):
        if "status line" in str(exc).lower() or "request line" in str(exc).lower():
            return 414, "uri_too_long", "the request line is too long"
        return 431, "headers_too_large", "a request header is too large"
    text = str(exc).lower() if exc is not None else ""
    if "too many headers" in text or ("header" in text and "too large" in text):
        return 431, "headers_too_large", "too many or too large request headers"
    if default == 500:
        return 500, "internal_error", "internal error"
    return default, "bad_request", "malformed HTTP request"


class _ProtocolHandler(web_protocol.RequestHandler):
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
        status, code, text = _status_for(exc, status)
        body = orjson.dumps({"error": {"code": code, "message": text, "request_id": ""}})
        response = web.Response(status=status, body=body, content_type="application/json")
        response.force_close()
        return response


class ProxyServer(web.Server):
    """A web.Server whose connections answer protocol errors as JSON."""

    def __call__(self) -> web_protocol.RequestHandler:
        return _ProtocolHandler(self, loop=self._loop, **self._kwargs)


def server_kwargs(
    *, max_line: int, max_field: int, header_timeout: float, max_headers: int
) -> dict[str, Any]:
    return {
        "max_line_size": max_line,
        "max_field_size": max_field,
        "max_headers": max_headers,
        "keepalive_timeout": header_timeout,
        "lingering_time": 0,
        "access_log": None,
    }
