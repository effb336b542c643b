"""Apply every matching limit in one storage round trip; 429 with headers, or pass."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import lru_cache

from shieldproxy.config import Config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.limits.engine import RateLimiter, Verdict
from shieldproxy.limits.headers import rate_limit_headers
from shieldproxy.limits.model import Hit, LimitRule
from shieldproxy.metrics import UNMATCHED_ROUTE
from shieldproxy.routes import Route

_STATUS = {
    "rate_limited": 429,
    "concurrency_limited": 429,
    "quota_exceeded": 429,
    "store_unavailable": 503,
}
_MESSAGES = {
    "rate_limited": "rate limit exceeded",
    "quota_exceeded": "the monthly quota is used up",
    "concurrency_limited": "too many requests in flight",
    "store_unavailable": "rate limits cannot be checked right now",
}
_LEGACY = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class RateLimitCheck:
    """Collects the rules that apply (global, route, and later the key's and tenant's own),
    resolves each rule's subject from the context, and asks the limiter once."""

    name = "rate_limit"

    def __init__(self, config: Config, limiter: RateLimiter) -> None:
        self._limiter = limiter
        fallback = config.store.on_store_error
        self._global = tuple(limit.to_rule(fallback) for limit in config.limits)
        self._by_route = {
            route.name: self._global + tuple(limit.to_rule(fallback) for limit in route.limits)
            for route in config.routes
        }
        options = config.rate_limits
        self._expose = options.expose_headers
        self._legacy = options.legacy_headers
        self._prefix = _prefixer(options.ipv4_prefix_length, options.ipv6_prefix_length)

    def rules_for(self, route: Route | None) -> tuple[LimitRule, ...]:
        return self._by_route.get(route.name, self._global) if route else self._global

    async def decide(self, ctx: RequestContext) -> Decision:
        route = ctx.route
        rules = self.rules_for(route)
        extra = ctx.extra_limits
        if not rules and not extra:
            return ALLOW
        cost = route.config.cost if route is not None else 1
        hits = [
            Hit(rule, subject, cost)
            for rule in rules
            if (subject := self._subject(rule, ctx, route)) is not None
        ]
        for rule, given in extra:
            subject = given if given is not None else self._subject(rule, ctx, route)
            if subject is not None:
                hits.append(Hit(rule, subject, cost))
        if not hits:
            return ALLOW
        verdict = await self._limiter.check(hits)
        ctx.limit_hits = hits
        ctx.limit_verdict = verdict
        headers = self._headers(hits, verdict)
        if verdict.degraded:
            headers.append(("X-Shield-Degraded", "store"))
        if verdict.allowed:
            if headers:
                ctx.add_response_headers(headers)
            # A shadow rule that would have denied is reported; a quota past its limit on
            # an overage-allowed plan is billable usage, not a would-be denial.
            if any(
                state.shadow_denied and hit.rule.strategy != "quota"
                for hit, state in zip(hits, verdict.states, strict=True)
            ):
                return Decision(allowed=False, shadow=True, status=429, code="rate_limited")
            return ALLOW
        code = verdict.code
        return Decision(
            allowed=False,
            status=_STATUS.get(code, 429),
            code=code,
            message=_MESSAGES.get(code, "rate limit exceeded"),
            headers=tuple(headers),
        )

    def _subject(self, rule: LimitRule, ctx: RequestContext, route: Route | None) -> str | None:
        """The value a rule counts by; None = the rule does not apply (e.g. no key yet)."""
        match rule.scope:
            case "ip":
                return ctx.client_ip
            case "ip_prefix":
                return self._prefix(ctx.client_ip)
            case "key":
                return ctx.key_id or None
            case "tenant":
                return ctx.tenant_id or None
            case "route":
                return route.name if route is not None else UNMATCHED_ROUTE
            case _:
                return ""

    def _headers(self, hits: list[Hit], verdict: Verdict) -> list[tuple[str, str]]:
        headers = rate_limit_headers(hits, verdict)
        if not self._expose:
            return [(k, v) for k, v in headers if k == "Retry-After"]
        if not self._legacy:
            return [(k, v) for k, v in headers if k not in _LEGACY]
        return headers


def _prefixer(v4: int, v6: int) -> Callable[[str], str]:
    """Client IP → its network (IPv6 clients rotate addresses inside their /64)."""

    @lru_cache(maxsize=65536)
    def prefix(ip: str) -> str:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        length = v4 if address.version == 4 else v6
        return str(ipaddress.ip_network(f"{address}/{length}", strict=False))

    return prefix
