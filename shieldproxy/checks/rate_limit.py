"""Apply every matching limit in one storage round trip; 429 with headers, or pass."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from dataclasses import dataclass

from shieldproxy.checks.client_ip import ip_prefixer
from shieldproxy.config import Config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.limits.engine import ALLOWED_FROM_RESERVES, HitSet, RateLimiter, Verdict
from shieldproxy.limits.headers import (
    ReserveFields,
    policy_header,
    rate_limit_headers,
    rule_text,
)
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
_MAX_LANES = 100_000

# (id(route), id(key limits), client ip, key id, tenant id): everything a request's hits depend on.
_LaneKey = tuple[int, int, str, str, str]


@dataclass(slots=True, eq=False)
class _Lane:
    """One request shape (route, key limits, client, key, tenant) and what is known about it.

    Requests of one busy client repeat the same shape: its hits, their storage keys, their
    reserves, its header text and its current denial are worked out once, so that such a
    request is answered with a few comparisons and one formatting of its header lines.
    """

    # Held, so that the ids in the lane's key name these objects for as long as it exists.
    route: Route | None
    extra: tuple[tuple[LimitRule, str | None], ...]
    hit_set: HitSet | None  # None: no rule applies to this shape
    fields: ReserveFields | None = None  # its fields when admitted from reserves (if shown)
    denial: Decision | None = None  # the answer to hit_set.denial...
    denial_wait: int = -1  # ...built for this many whole seconds left


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
        self._prefix = ip_prefixer(options.ipv4_prefix_length, options.ipv6_prefix_length)
        self._lanes: dict[_LaneKey, _Lane] = {}
        # No rule anywhere in the config: only a key's own limits can apply.
        self._no_rules = not self._global and not any(self._by_route.values())
        # Its epoch tells a lane's fields whether a reset may have moved (ReserveFields).
        self._reservations = limiter.reservations

    def rules_for(self, route: Route | None) -> tuple[LimitRule, ...]:
        return self._by_route.get(route.name, self._global) if route else self._global

    def decide(self, ctx: RequestContext) -> Decision | Awaitable[Decision]:
        extra = ctx.extra_limits
        if not extra and self._no_rules:
            return ALLOW
        route = ctx.route
        lane_key = (id(route), id(extra), ctx.client_ip, ctx.key_id, ctx.tenant_id)
        lane = self._lanes.get(lane_key)
        if lane is None:
            if not extra and not self.rules_for(route):
                return ALLOW  # nothing applies: no lane kept for it
            lane = self._new_lane(ctx, lane_key)
        hit_set = lane.hit_set
        if hit_set is None:
            return ALLOW  # no rule applies to this shape
        limiter = self._limiter
        now = limiter.now()
        if (spent := limiter.take_reserved(hit_set, now)) is not None:
            ctx.limit_hits = hit_set.hits
            ctx.limit_verdict = ALLOWED_FROM_RESERVES
            fields = lane.fields
            if fields is not None:
                assert self._reservations is not None  # it made the reserves spent
                ctx.response_fields += fields.render(spent, now, self._reservations.epoch)
            return ALLOW
        if (
            lane.denial is not None
            and now < hit_set.denied_until
            and lane.denial_wait == math.ceil(hit_set.denied_until - now)
        ):
            # Still over the limit, and every header would read the same: the same answer.
            limiter.count_cached_denial()
            ctx.limit_hits = hit_set.hits
            ctx.limit_verdict = hit_set.denial
            return lane.denial
        return self._check(ctx, lane, now)

    def _new_lane(self, ctx: RequestContext, lane_key: _LaneKey) -> _Lane:
        route = ctx.route
        extra = ctx.extra_limits
        cost = route.config.cost if route is not None else 1
        hits = [
            Hit(rule, subject, cost)
            for rule in self.rules_for(route)
            if (subject := self._subject(rule, ctx, route)) is not None
        ]
        for rule, given in extra:
            subject = given if given is not None else self._subject(rule, ctx, route)
            if subject is not None:
                hits.append(Hit(rule, subject, cost))
        lane = _Lane(route, extra, self._limiter.hit_set(hits) if hits else None)
        if self._expose and (
            shown := [
                (i, rule_text(h.rule)[0], h.rule.ceiling)
                for i, h in enumerate(hits)
                if not h.rule.shadow
            ]
        ):
            policy = policy_header(h.rule for h in hits)
            lane.fields = ReserveFields(policy, shown, self._legacy)
        lanes = self._lanes
        lanes.pop(lane_key, None)
        lanes[lane_key] = lane
        if len(lanes) > _MAX_LANES:
            del lanes[next(iter(lanes))]  # the oldest shape: rebuilding one costs microseconds
        return lane

    async def _check(self, ctx: RequestContext, lane: _Lane, now: float) -> Decision:
        """Ask the limiter: the store, its over-limit cache or the fallback. A denial from its
        over-limit cache is kept on the lane for the requests that follow."""
        hit_set = lane.hit_set
        assert hit_set is not None  # a lane without hits admits at once
        hits = hit_set.hits
        verdict = await self._limiter.check(hits, hit_set)
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
        decision = Decision(
            allowed=False,
            status=_STATUS.get(code, 429),
            code=code,
            message=_MESSAGES.get(code, "rate limit exceeded"),
            headers=tuple(headers),
        )
        if verdict is hit_set.denial:
            lane.denial = decision
            lane.denial_wait = math.ceil(hit_set.denied_until - now)
        return decision

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
