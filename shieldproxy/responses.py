"""The HTTP answer for a denial or a fault: the contract's JSON error body."""

from __future__ import annotations

import orjson
from aiohttp import web

from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision

# The rest of the request is unread (or, after a refused CONNECT, not HTTP at all).
_CLOSE_AFTER = frozenset({400, 405, 408, 413, 414, 431})


def deny_response(ctx: RequestContext, decision: Decision) -> web.Response:
    """The contract's JSON error body, with the decision's headers."""
    body = orjson.dumps(
        {
            "error": {
                "code": decision.code,
                "message": decision.message,
                "request_id": ctx.request_id,
            }
        }
    )
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
    if ctx.response_headers:
        for name, value in ctx.response_headers:
            headers[name] = value
    if decision.status in _CLOSE_AFTER:
        response.force_close()
    return response
