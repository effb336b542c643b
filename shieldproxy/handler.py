"""THE request path: context → checks in order → deny or forward → measure."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import hdrs, web

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny
from shieldproxy.errors import ShieldError, UpstreamError, fault_decision
from shieldproxy.http_server import Handover, expect_denials, handed_over
from shieldproxy.metrics import UNMATCHED_ROUTE
from shieldproxy.responses import deny_response, laid_out
from shieldproxy.state import ProxyState, Runtime
from shieldproxy.websocket import is_websocket_upgrade, relay_websocket

CANCELLED = 499  # nginx's status for a request whose client went away before its answer


async def _raise(exc: Exception) -> Decision:
    raise exc


class ProxyHandler:
    """Answers every request on the proxy listener."""

    def __init__(self, state: ProxyState, clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = clock  # the event loop's monotonic time

    def answer_early(self, request: web.BaseRequest) -> bytes | Handover:
        """Decide a request as its head arrives, before aiohttp makes a task for it.

        The protocol calls this for a request without a body that arrives while no request
        is being handled, on a connection whose last request was denied (a flood's look:
        http_server.expect_denials). A denial decided at once and laid out
        (responses.laid_out) is counted here and returned as the bytes to write: the request
        is done. Anything else returns the context and the pipeline's outcome, which
        __call__ takes up when aiohttp hands it the request (the checks never run twice).

        Why: an over-limit flood is answered at the cost of the checks and one write, not
        that plus a task, a response object and a turn of the event loop or two.
        """
        state = self._state
        runtime = state.runtime
        ctx = RequestContext(request, state.ids.next(), self._clock())
        try:
            outcome = runtime.pipeline.begin(ctx)
            if (
                isinstance(outcome, Decision)
                and not outcome.allowed
                and (ctx.limit_verdict is None or ctx.limit_verdict.lease is None)
                and (layout := laid_out(ctx, outcome)) is not None
            ):
                answer = layout.raw(ctx.request_id)
                self._record_answer(ctx, outcome.status, outcome, ctx.started)
                return answer
        except Exception as exc:  # a bug: raised by __call__, to be answered 500 as ever
            return ctx, _raise(exc), runtime
        return ctx, outcome, runtime

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self._state
        metrics = state.metrics
        handover = handed_over(request)
        if handover is None:
            runtime = state.runtime
            started = self._clock()
            ctx = RequestContext(request, state.ids.next(), started)
            outcome = None
        else:
            ctx, outcome, runtime = handover
            started = ctx.started
        metrics.in_flight += 1
        try:
            decision = runtime.pipeline.begin(ctx) if outcome is None else outcome
            if not isinstance(decision, Decision):
                decision = await decision  # a check waits for the store
            if decision.allowed:
                response = await self._forward(ctx, runtime)
            else:
                response = deny_response(ctx, decision)
                # Denied once, likely again (a flood): the connection's next requests are
                # decided as their heads arrive (answer_early).
                expect_denials(request)
            self._record_answer(ctx, response.status, ctx.decision or decision, started)
            return response
        except asyncio.CancelledError:
            # aiohttp cancels a request whose client hung up (handler_cancellation), and one
            # still running when the shutdown budget ends; its upstream work was closed on the
            # way out. Counted as nginx logs it: 499, unless the answer had begun (a stream cut
            # short counts as the status it was sent with, however the loss was noticed).
            if ctx.sent_status:
                self._record_answer(ctx, ctx.sent_status, ALLOW, started)
            else:
                self._record(ctx, CANCELLED, "cancelled", "", started)
            raise
        except Exception:
            # A bug: aiohttp logs it and answers 500; it is counted like any other answer.
            self._record(ctx, 500, "error", "internal_error", started)
            raise
        finally:
            metrics.in_flight -= 1
            limited = ctx.limit_verdict
            # Only a concurrency lease or a post-response charge needs work afterwards. The
            # limiter's own task: a second cancellation (the client closing right after the
            # answer, or the shutdown) must not skip freeing the slot or billing what the
            # upstream used, and the limiter's close() waits for it.
            if limited is not None and (limited.lease is not None or ctx.upstream_charge):
                charge = ctx.upstream_charge if runtime.charge_header else 0
                settling = runtime.limiter.settle(limited.lease, ctx.limit_hits or (), charge)
                await asyncio.shield(settling)

    def _record_answer(
        self, ctx: RequestContext, status: int, final: Decision, started: float
    ) -> None:
        verdict = "allow" if final.allowed else "deny"
        if ctx.shadow_denials and final.allowed:
            verdict = "shadow_deny"
        self._record(ctx, status, verdict, final.code, started)

    def _record(
        self, ctx: RequestContext, status: int, verdict: str, reason: str, started: float
    ) -> None:
        route = ctx.route.name if ctx.route is not None else UNMATCHED_ROUTE
        self._state.metrics.record(route, status, verdict, reason, self._clock() - started)

    async def _forward(self, ctx: RequestContext, runtime: Runtime) -> web.StreamResponse:
        request = ctx.request
        expect = request.headers.get(hdrs.EXPECT)
        if expect is not None:
            if expect.lower() != "100-continue":
                return self._fault(ctx, deny(417, "expectation_failed", "unsupported Expect"))
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            if is_websocket_upgrade(request):
                return await relay_websocket(ctx, runtime)
            response = await runtime.forwarder.forward(ctx)
        except ShieldError as exc:
            if isinstance(exc, UpstreamError):
                self._state.metrics.upstream_error(exc.kind)
            return self._fault(ctx, fault_decision(exc))
        if ctx.upstream_error is not None:
            self._state.metrics.upstream_error(ctx.upstream_error.kind)
        return response

    def _fault(self, ctx: RequestContext, decision: Decision) -> web.StreamResponse:
        ctx.decision = decision
        return deny_response(ctx, decision)
