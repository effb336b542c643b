"""THE request path: context → checks in order → deny or forward → measure."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web

from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision, deny
from shieldproxy.errors import ShieldError, UpstreamError, fault_decision
from shieldproxy.metrics import UNMATCHED_ROUTE
from shieldproxy.state import ProxyState
from shieldproxy.websocket import is_websocket_upgrade, relay_websocket

_CLOSE_AFTER = frozenset({400, 408, 413, 414, 431})  # the rest of the request is unread


class ProxyHandler:
    """Answers every request on the proxy listener."""

    def __init__(self, state: ProxyState, clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = clock  # the event loop's monotonic time

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self._state
        runtime = state.runtime
        metrics = state.metrics
        started = self._clock()
        ctx = RequestContext(request, state.ids.next(), started)
        metrics.in_flight += 1
        try:
            decision = await runtime.pipeline.run(ctx)
            if decision.allowed:
                response = await self._forward(ctx)
            else:
                response = deny_response(ctx, decision)
        finally:
            metrics.in_flight -= 1
        route = ctx.route.name if ctx.route is not None else UNMATCHED_ROUTE
        final = ctx.decision or decision
        verdict = "allow" if final.allowed else "deny"
        if ctx.shadow_denials and final.allowed:
            verdict = "shadow_deny"
        metrics.record(route, response.status, verdict, final.code, self._clock() - started)
        return response

    async def _forward(self, ctx: RequestContext) -> web.StreamResponse:
        request = ctx.request
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                return self._fault(ctx, deny(417, "expectation_failed", "unsupported Expect"))
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        forwarder = self._state.runtime.forwarder
        try:
            if is_websocket_upgrade(request):
                return await relay_websocket(ctx, self._state.runtime)
            response = await forwarder.forward(ctx)
        except ShieldError as exc:
            if isinstance(exc, UpstreamError):
                self._state.metrics.upstream_error(exc.kind)
            return self._fault(ctx, fault_decision(exc))
        if ctx.upstream_error is not None:
            self._state.metrics.upstream_error(ctx.upstream_error.kind)
        return response

    def _fault(self, ctx: RequestContext, decision: Decision) -> web.Response:
        ctx.decision = decision
        return deny_response(ctx, decision)


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
