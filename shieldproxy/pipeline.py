"""The checks, in their one declared order, and the loop that runs them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator, Sequence
from typing import Any

from shieldproxy.checks.api_key import ApiKeyCheck
from shieldproxy.checks.base import Check
from shieldproxy.checks.client_ip import ClientIpCheck
from shieldproxy.checks.rate_limit import RateLimitCheck
from shieldproxy.checks.request_size import RequestSizeCheck
from shieldproxy.checks.request_target import RequestTargetCheck
from shieldproxy.checks.route import RouteCheck
from shieldproxy.checks.scopes import ScopesCheck
from shieldproxy.config import Config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.limits.engine import RateLimiter
from shieldproxy.routes import RouteTable


def default_checks(config: Config, limiter: RateLimiter, registry: KeyRegistry) -> list[Check]:
    """Every request meets these checks in this order; the first deny answers it.

    Later checks may read what earlier ones wrote on the context (the client IP, the
    canonical path, the route), never the other way round.
    """
    server = config.server
    return [
        ClientIpCheck(server.trusted_proxies),
        RequestTargetCheck(),
        RequestSizeCheck(server.max_header_bytes, server.max_header_count, server.max_body_bytes),
        RouteCheck(RouteTable(config.routes)),
        ApiKeyCheck(config, registry),
        ScopesCheck(),
        RateLimitCheck(config, limiter),
    ]


class Pipeline:
    """Runs checks in order. A shadow deny is recorded on the context and passed over."""

    __slots__ = ("checks",)

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = tuple(checks)
        # A PendingRun resumes after its check by finding it here: each appears once.
        assert len({id(check) for check in self.checks}) == len(self.checks), "a check twice"

    async def run(self, ctx: RequestContext) -> Decision:
        decision = self.begin(ctx)
        return decision if isinstance(decision, Decision) else await decision

    def begin(self, ctx: RequestContext) -> Decision | PendingRun:
        """Runs the checks up to the first that has to wait for the store; returns the
        decision, or a PendingRun that waits and runs the rest.

        Why not only `run`: most requests meet no check that waits, and then neither does
        their caller (the protocol answers a flood's denials as their heads arrive,
        handler.ProxyHandler.answer_early) nor does it pay for a coroutine."""
        for check in self.checks:
            decision = check.decide(ctx)
            if decision is ALLOW:
                continue
            if not isinstance(decision, Decision):
                return PendingRun(self, ctx, check, decision)  # the check waits for the store
            if self._passes(ctx, decision):
                continue
            return decision
        return ALLOW

    async def finish(
        self, ctx: RequestContext, waiting: Check, pending: Awaitable[Decision]
    ) -> Decision:
        """`waiting`'s decision once it has come, then the checks after it, as begin()."""
        decision = await pending
        if not self._passes(ctx, decision):
            return decision
        checks = self.checks
        for check in checks[checks.index(waiting) + 1 :]:
            outcome = check.decide(ctx)
            if outcome is ALLOW:
                continue
            decision = outcome if isinstance(outcome, Decision) else await outcome
            if not self._passes(ctx, decision):
                return decision
        return ALLOW

    @staticmethod
    def _passes(ctx: RequestContext, decision: Decision) -> bool:
        """Allowed, or a shadow denial (recorded on the context): the next check runs."""
        if decision.allowed:
            return True
        if decision.shadow:
            if ctx.shadow_denials is None:
                ctx.shadow_denials = []
            ctx.shadow_denials.append(decision)
            return True
        return False


class PendingRun:
    """The rest of a pipeline run whose check `waiting` has to wait for the store: awaiting
    it awaits that check's decision, then runs the checks after it.

    Not a coroutine of its own, so that a run never awaited (its client went before) can be
    closed without leaving the check's own coroutine unawaited."""

    __slots__ = ("_ctx", "_pending", "_pipeline", "_waiting")

    def __init__(
        self, pipeline: Pipeline, ctx: RequestContext, waiting: Check, pending: Awaitable[Decision]
    ) -> None:
        self._pipeline = pipeline
        self._ctx = ctx
        self._waiting = waiting
        self._pending = pending

    def __await__(self) -> Generator[Any, None, Decision]:
        return self._pipeline.finish(self._ctx, self._waiting, self._pending).__await__()

    def close(self) -> None:
        """Never to be awaited: the check's coroutine is closed (its future cancelled; any
        other awaitable has nothing running to stop)."""
        pending = self._pending
        if isinstance(pending, Coroutine):
            pending.close()
        elif isinstance(pending, asyncio.Future):
            pending.cancel()
