"""The checks, in their one declared order, and the loop that runs them."""

from __future__ import annotations

from collections.abc import Sequence

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

    async def run(self, ctx: RequestContext) -> Decision:
        for check in self.checks:
            decision = check.decide(ctx)
            if decision is ALLOW:
                continue
            if not isinstance(decision, Decision):
                decision = await decision  # the check has to wait for the store
            if decision.allowed:
                continue
            if decision.shadow:
                if ctx.shadow_denials is None:
                    ctx.shadow_denials = []
                ctx.shadow_denials.append(decision)
                continue
            return decision
        return ALLOW
