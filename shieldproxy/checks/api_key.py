"""Authenticate the API key: format in-process, record from the cache, status and expiry."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, unquote_plus

from aiohttp import hdrs
from multidict import istr

from shieldproxy.checks.client_ip import ip_prefixer
from shieldproxy.config import Config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny
from shieldproxy.keys.guard import UnknownKeyGuard
from shieldproxy.keys.records import KeyView, billing_period
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.keys.secret import well_formed
from shieldproxy.limits.model import LimitRule
from shieldproxy.store.base import StoreError

# Header names as multidict.istr: looked up without case-folding them per request.
_X_API_KEY = istr("X-API-Key")

MISSING = deny(401, "missing_key", "an API key is required (Authorization: Bearer <key>)")
INVALID = deny(401, "invalid_key", "the API key is not valid")
EXPIRED = deny(401, "expired_key", "the API key has expired")
REVOKED = deny(401, "revoked_key", "the API key has been revoked")
TWO_KEYS = deny(400, "bad_request", "two different API keys in one request")
UNAVAILABLE = deny(503, "store_unavailable", "API keys cannot be checked right now", retry_after=1)


class ApiKeyCheck:
    """Reads the key from `Authorization: Bearer`, `X-API-Key` (or a query parameter when
    enabled), and fills the identity every later check and the upstream rely on."""

    name = "api_key"

    def __init__(
        self,
        config: Config,
        registry: KeyRegistry,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._required = config.auth.required
        self._query_parameter = config.auth.query_parameter
        self._registry = registry
        self._last_used = registry.last_used
        self._wall = wall_clock
        per_minute = config.auth.unknown_keys_per_minute
        self._guard = UnknownKeyGuard(per_minute) if per_minute > 0 else None
        options = config.rate_limits
        self._network = ip_prefixer(options.ipv4_prefix_length, options.ipv6_prefix_length)
        # key id → (the view it was built for, period end, limits with this period's quotas)
        self._quota_cache: dict[
            str, tuple[KeyView, float, tuple[tuple[LimitRule, str | None], ...]]
        ] = {}

    def decide(self, ctx: RequestContext) -> Decision | Awaitable[Decision]:
        headers = ctx.request.headers
        if _X_API_KEY not in headers and not (self._query_parameter and ctx.query):
            # The common case, one place to look at most: nothing to reconcile.
            authorization = headers.get(hdrs.AUTHORIZATION)
            secret = bearer_token(authorization) if authorization is not None else None
            source = "authorization"
        else:
            secret, source = self._extract(ctx)
        if secret is None:
            return MISSING if self._required_on(ctx) else ALLOW
        ctx.key_source = source  # whatever happens next, the key is not forwarded
        if source == "conflict":
            return TWO_KEYS
        view = self._registry.cached_view(secret)  # a known caller: no checksum, no HMAC
        if view is None:
            return self._authenticate(ctx, secret)
        decision = self._admit(ctx, view)
        return decision if decision is ALLOW else self._unless_optional(ctx, decision)

    def _required_on(self, ctx: RequestContext) -> bool:
        route = ctx.route
        if route is not None and route.config.auth is not None:
            return route.config.auth
        return self._required

    def _unless_optional(self, ctx: RequestContext, decision: Decision) -> Decision:
        # An optional key that does not check out: anonymous, not an error.
        return decision if decision is ALLOW or self._required_on(ctx) else ALLOW

    async def _authenticate(self, ctx: RequestContext, secret: str) -> Decision:
        """A secret the cache does not vouch for: checked, looked up, then admitted."""
        return self._unless_optional(ctx, await self._look_up(ctx, secret))

    async def _look_up(self, ctx: RequestContext, secret: str) -> Decision:
        if not well_formed(secret):
            return INVALID  # typos and made-up keys never reach the store
        # Made-up keys with valid checksums: a bounded number of lookups per network.
        # A secret that named a key before (its cache entry gone stale) is not counted.
        guard = None if self._registry.knows(secret) else self._guard
        if guard is not None:
            network = self._network(ctx.client_ip)
            if (wait := guard.retry_after(network)) is not None:
                return too_many_unknown_keys(wait)
            guard.charge(network)
        try:
            view = await self._registry.lookup(secret)
        except StoreError:  # a fault, never the client's: 503, not 401 and not 500
            if guard is not None:
                guard.forgive(network)
            return UNAVAILABLE
        if view is None:
            return INVALID
        if guard is not None:
            guard.forgive(network)
        return self._admit(ctx, view)

    def _admit(self, ctx: RequestContext, view: KeyView) -> Decision:
        """The key's status and dates, then its identity on the context. Synchronous: a
        cached caller, the common case, costs no coroutine."""
        now = self._wall()
        if now >= view.usable_until:  # revoked, expired or rotated out: which one?
            if view.revoked:
                return REVOKED
            if view.expires_at is not None and now >= view.expires_at:
                return EXPIRED
            return INVALID  # a rotated-out secret past its grace period
        ctx.key = view
        ctx.key_id = view.id
        ctx.tenant_id = view.tenant_id
        ctx.extra_limits = self._limits_of(view, now) if view.has_quota else view.limits
        self._last_used[view.id] = now  # written to the store in batches (KeyRegistry)
        return ALLOW

    def _limits_of(self, view: KeyView, now: float) -> tuple[tuple[LimitRule, str | None], ...]:
        """The key's limits plus this period's quotas (it has some), built once per view and
        period: the billing period is calendar arithmetic, too slow to redo on every request."""
        cached = self._quota_cache.get(view.id)
        if cached is not None and cached[0] is view and now < cached[1]:
            return cached[2]
        quotas = quota_limits(view, now)
        limits = view.limits + quotas
        if len(self._quota_cache) >= 100_000:
            self._quota_cache.clear()
        self._quota_cache[view.id] = (view, quotas[0][0].period_end, limits)
        return limits

    def _extract(self, ctx: RequestContext) -> tuple[str | None, str]:
        """The key wherever it may be (X-API-Key or the query parameter as well), and where
        it came from; ("", "conflict") for two different keys."""
        headers = ctx.request.headers
        found: list[tuple[str, str]] = []
        authorization = headers.get(hdrs.AUTHORIZATION)
        if authorization is not None and (bearer := bearer_token(authorization)) is not None:
            found.append((bearer, "authorization"))
        if (api_key := headers.get(_X_API_KEY)) is not None:
            found.append((api_key.strip(), "x-api-key"))
        if self._query_parameter and ctx.query:
            for name, value in parse_qsl(ctx.query, keep_blank_values=True):
                if name == self._query_parameter:
                    found.append((value, "query"))
                    ctx.query = strip_query_parameter(ctx.query, name)
        if not found:
            return None, ""
        secrets = {secret for secret, _ in found}
        if len(secrets) > 1:
            return "", "conflict"
        return found[0][0], "authorization" if len(found) > 1 else found[0][1]


@functools.lru_cache(maxsize=4096)
def bearer_token(authorization: str) -> str | None:
    """The key an `Authorization: Bearer sp_...` header holds; None for any other credential
    (another scheme, or a token that is not ours: the upstream's own auth passes through).

    Remembered per header value: a caller sends the same one on every request, and a lookup
    costs a quarter of parsing it; the secret comes back as the same string object, whose
    hash the registry's lookup then reuses. Bounded: made-up values only push others out."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token.startswith("sp_") else None


def too_many_unknown_keys(wait: float) -> Decision:
    return deny(
        429,
        "rate_limited",
        "too many unknown API keys from this address",
        retry_after=max(1, math.ceil(wait)),
    )


def strip_query_parameter(query: str, name: str) -> str:
    """The query without the key parameter, so the key never reaches the upstream; every
    other piece is kept byte for byte (no re-encoding)."""
    kept = [piece for piece in query.split("&") if unquote_plus(piece.partition("=")[0]) != name]
    return "&".join(kept)


def quota_limits(view: KeyView, now: float) -> tuple[tuple[LimitRule, str | None], ...]:
    """This billing period's quota counters: the key's own, and the tenant plan's."""
    if not view.quota and not view.plan_quota:
        return ()
    start, end = billing_period(view.anchor_day, now)
    period = int(start)
    limits: list[tuple[LimitRule, str | None]] = []
    if view.quota:
        rule = LimitRule("quota", "key", "quota", view.quota, end - start, period_end=end)
        limits.append((rule, f"{view.id}@{period}"))
    if view.plan_quota and view.tenant_id:
        rule = LimitRule(
            "plan-quota",
            "tenant",
            "quota",
            view.plan_quota,
            end - start,
            shadow=view.plan_overage == "allow",
            period_end=end,
        )
        limits.append((rule, f"{view.tenant_id}@{period}"))
    return tuple(limits)
