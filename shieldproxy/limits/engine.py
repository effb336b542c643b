"""RateLimiter: one atomic store call per request, plus over-limit cache, fallback and leases."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from shieldproxy.limits import keys
from shieldproxy.limits.cache import OverLimitCache
from shieldproxy.limits.fallback import LocalFallback, QuotaBacklog
from shieldproxy.limits.model import Hit, LimitRule, Strategy
from shieldproxy.limits.reserve import (
    TAKEN_LOW,
    GiveBack,
    Reservations,
    Reserve,
    Spend,
    spends_of,
)
from shieldproxy.store.base import (
    CallResult,
    CircuitOpen,
    LimitCall,
    Store,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    batch_admits,
)

log = logging.getLogger(__name__)

_Template = tuple[LimitRule, str, str, int, int, int]
_RENEW_SLICE = 256  # concurrency leases per renewal call


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    # Keys go under the store's prefix; setting this is only for a limiter that must differ.
    prefix: str | None = None
    heartbeat_interval_seconds: float = 5.0
    instance_ttl_seconds: float = 15.0  # an instance missing 3 heartbeats no longer counts
    closed_retry_after_seconds: float = 1.0  # Retry-After for store_unavailable (the cool-down)
    cache_max_entries: int = 100_000
    fallback_max_entries: int = 100_000
    quota_backlog_max_counters: int = 100_000  # quota counters owed to a store that was down
    # Busy subjects: reserve this much of their traffic ahead from the store (see reserve.py);
    # 0 asks the store for every request.
    reserve_seconds: float = 0.1
    reserve_max_units: int = 10_000  # per key and grant
    reserve_max_entries: int = 100_000
    reserve_min_limit: int = 1000  # smaller limits stay exact per request


# Built several times per request: not frozen, because a frozen dataclass pays
# object.__setattr__ per field (~0.9 µs more per instance). Treat it as immutable.
@dataclass(slots=True)
class LimitState:
    """One hit's outcome, for headers and decision logs."""

    name: str
    limit: int
    remaining: int
    reset_seconds: float
    allowed: bool
    shadow_denied: bool
    used: int = 0  # quota only: units counted this period, overage included


@dataclass(frozen=True, slots=True)
class Lease:
    """Concurrency slots held by one admitted request; pass to RateLimiter.release when done."""

    token: str
    calls: tuple[LimitCall, ...]
    local: bool  # granted by the degraded-mode fallback, so released there


# Built several times per request: not frozen, because a frozen dataclass pays
# object.__setattr__ per field (~0.9 µs more per instance). Treat it as immutable.
@dataclass(slots=True)
class Verdict:
    allowed: bool
    # "" | "rate_limited" | "quota_exceeded" | "concurrency_limited" | "store_unavailable"
    code: str
    states: tuple[LimitState, ...]  # one per hit, in order
    retry_after: float | None  # whole seconds >= 1 when denied
    degraded: bool  # answered by the local fallback because the store failed
    lease: Lease | None


@dataclass(slots=True)
class LimiterStats:
    """Plain counters that metrics.py exports (see counts); no labels by key or IP by
    construction."""

    # Limit checks not answered from reserves (the store, its over-limit cache, the fallback):
    # `reserved` counts the others, so that a busy request bumps one counter (see checks).
    asked: int = 0
    denied: int = 0
    cache_denied: int = 0  # denied from the over-limit cache without a store call
    shadow_denied: int = 0
    degraded: int = 0  # answered by fallback
    store_errors: int = 0
    release_errors: int = 0
    # concurrency leases held on because their request outlived half of one, or put back into
    # a store that lost them
    renewed: int = 0
    renew_errors: int = 0
    charge_errors: int = 0
    quota_owed: int = 0  # quota units admitted during an outage, queued for the store
    quota_recharged: int = 0  # ... of which charged to the store after it recovered
    quota_dropped: int = 0  # ... of which dropped because the backlog was full
    reserved: int = 0  # admitted from units reserved ahead, without a store call
    given_back: int = 0  # reserved units returned to the store unspent
    refills: int = 0  # store calls that reserved ahead for a busy subject
    give_back_errors: int = 0

    @property
    def checks(self) -> int:
        """Every limit check, whichever path answered it."""
        return self.asked + self.reserved

    def counts(self) -> dict[str, int]:
        """The counters by event name, as exported: `checks` in place of `asked`."""
        counts = dataclasses.asdict(self)
        del counts["asked"]
        counts["checks"] = self.checks
        return counts


ALLOWED_NOTHING = Verdict(True, "", (), None, False, None)
# The verdict of a request admitted from reserved units: nothing to release or settle after it.
# Its per-limit state is in the reserves themselves (see HitSet.reserves); no states are built.
ALLOWED_FROM_RESERVES = Verdict(True, "", (), None, False, None)


@dataclass(slots=True, eq=False)
class HitSet:
    """The hits of one request shape (same rules, same subjects), with what the limiter works
    out about them once instead of per request: their storage keys, the reserves they spend
    from, and until when the over-limit cache denies them. A caller that keeps one per shape
    (checks.rate_limit does) makes a busy subject's request cost a few comparisons."""

    hits: list[Hit]
    keys: list[str]
    distinct: bool  # no two hits on one storage key (else they are merged per request)
    # (cost, limit) of each hit, what spending from reserves checks; None when a hit costs
    # nothing (such a request is never admitted from reserves)
    needs: tuple[tuple[int, int], ...] | None
    # One reserve per hit once all have been reserved for, and then also `spends`: each
    # with its hit's (cost, limit), as take_from spends them (None: not yet).
    reserves: list[Reserve] = dataclasses.field(default_factory=list)
    spends: tuple[Spend, ...] | None = None
    denied_until: float = 0.0  # limiter clock: the over-limit cache denies these hits until...
    denial: Verdict | None = None  # ...with this verdict (the last one it gave)

    def hold(self, found: list[Reserve] | None) -> None:
        """Spend from these reserves, one per hit, from now on (None: none known)."""
        self.reserves = found or []
        needs = self.needs
        self.spends = None if found is None or needs is None else spends_of(found, needs)


class RateLimiter:
    """The one place that turns hits into a verdict. Build once per process, pass it in."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        settings: LimiterSettings | None = None,
    ) -> None:
        self._store = store
        # The limiter's clock (reserve and denial times are in it). The callable itself, not a
        # method around it: callers on the hot path read it once per request.
        self.now = clock
        # Quota periods are calendar months: their ends are wall-clock instants.
        self._wall = wall_clock
        self._settings = settings or LimiterSettings()
        self._prefix = self._settings.prefix or store.prefix
        self._cache = OverLimitCache(max_entries=self._settings.cache_max_entries)
        # id(rule) -> (rule, key head, key tail, window_ms, burst, period_end_ms); the rule is
        # kept in the value so a recycled id can never match a different rule.
        self._templates: dict[int, _Template] = {}
        self._local = LocalFallback(max_entries=self._settings.fallback_max_entries)
        settings = self._settings
        # Units reserved ahead (None: off). Public for its epoch (limits.headers.ReserveFields);
        # only the limiter changes it.
        self.reservations = (
            Reservations(
                horizon_seconds=settings.reserve_seconds,
                max_units=settings.reserve_max_units,
                max_entries=settings.reserve_max_entries,
                min_limit=settings.reserve_min_limit,
            )
            if settings.reserve_seconds > 0
            else None
        )
        self._sweeper_task: asyncio.Task[None] | None = None
        self._backlog = QuotaBacklog(max_counters=self._settings.quota_backlog_max_counters)
        self._settling: asyncio.Task[None] | None = None
        self._instance_id = uuid.uuid4().hex
        self._seq = itertools.count()
        # token -> (lease held by a request in flight, clock time its renewal is due)
        self._leases: dict[str, tuple[Lease, float]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._degraded = False
        self._refused = False  # refused since the last heartbeat that got through (logged)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self.stats = LimiterStats()
        store.on_data_lost(self._store_lost_data)

    @property
    def degraded(self) -> bool:
        """True while the store is failing and limits are answered by fallback policy."""
        return self._degraded

    @property
    def live_instances(self) -> int:
        return self._local.live_instances

    async def start(self) -> None:
        """Begin heartbeats (live-instance count for fallback limits). Call once from server."""
        await self._beat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        if self.reservations is not None:
            self._sweeper_task = asyncio.create_task(self._give_back_loop())

    async def close(self) -> None:
        self._closing = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
            self._heartbeat_task = None
            with contextlib.suppress(StoreError):
                await self._store.heartbeat(self._instance_id, 0)  # leave the live set now
        if self._sweeper_task is not None:
            self._sweeper_task.cancel()
            await asyncio.gather(self._sweeper_task, return_exceptions=True)
            self._sweeper_task = None
        if self.reservations is not None:
            # Refills still in flight first: what they reserve is given back with the rest.
            await asyncio.gather(*self._background, return_exceptions=True)
            await self._give_back(self.reservations.drain())
        for lease, _ in list(self._leases.values()):
            await self.release(lease)
        while self._background:  # what they spawn too (a renewal's second release)
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._backlog:
            await self._settle_backlog()  # last chance; what still fails is logged as lost
            if self._backlog:
                lost = sum(c.cost for c in self._backlog.take())
                self.stats.quota_dropped += lost
                log.error("%d quota units owed to the store were lost at shutdown", lost)

    # ---- the hot path ---------------------------------------------------------------------------

    def hit_set(self, hits: list[Hit]) -> HitSet:
        """Resolve what `check` needs about these hits once, for reuse by the same shape."""
        keys_ = [self._key(h) for h in hits]
        needs = tuple((h.cost, h.rule.requests) for h in hits)
        free = any(cost < 1 for cost, _ in needs)
        return HitSet(hits, keys_, len(set(keys_)) == len(keys_), None if free else needs)

    def take_reserved(self, hit_set: HitSet, now: float) -> list[Reserve] | None:
        """Admit from units reserved earlier, synchronously, or touch nothing and say None.

        The hot path for a busy subject: no store call, no verdict built. The reserves it
        spent from come back: the caller reads the per-limit state from them."""
        spends = hit_set.spends
        if spends is None:  # set only with reserves on and needs known (see check)
            return None
        reserves = self.reservations
        assert reserves is not None
        taken = reserves.take_from(spends, now)
        if not taken:  # NOT_TAKEN
            return None
        self.stats.reserved += 1
        found = hit_set.reserves
        if taken == TAKEN_LOW and not self._closing and (wanted := reserves.refill(found, now)):
            self._spawn(self._refill(hit_set, wanted))
        return found

    async def _refill(self, hit_set: HitSet, wanted: list[tuple[int, int]]) -> None:
        """Reserve more units for a busy subject before it runs out: a cost-0 store call."""
        assert self.reservations is not None
        token = f"{self._instance_id}:{next(self._seq)}"
        hits = [hit_set.hits[i] for i, _ in wanted]
        keys_ = [hit_set.keys[i] for i, _ in wanted]
        calls = [self._call(h, token, 0, units) for h, (_, units) in zip(hits, wanted, strict=True)]
        # The store's times (window end, reset) are counted from before the call: a grant must
        # never look valid past the window it was counted in.
        sent = self.now()
        try:
            results: list[CallResult] | None = await self._store.acquire(calls)
        except StoreError:
            results = None  # the next request asks again, or goes to the store itself
        except BaseException:
            self.reservations.settle(keys_, calls, None, sent)  # not asking any more
            raise
        self.reservations.settle(keys_, calls, results, sent)
        self.stats.refills += 1

    def count_cached_denial(self) -> None:
        """A caller answered with a denial it kept from `check` (see HitSet.denial)."""
        stats = self.stats
        stats.asked += 1
        stats.cache_denied += 1
        stats.denied += 1

    async def check(self, hits: Sequence[Hit], hit_set: HitSet | None = None) -> Verdict:
        """Admit and consume all hits, or deny and consume nothing.

        `hit_set`, from `hit_set(hits)` for these very hits, saves resolving them again and
        learns the reserves and cached denial the next request of that shape can use."""
        if not hits:
            return ALLOWED_NOTHING
        now = self.now()
        # Storage keys first: an over-limit flood is answered from the cache below without
        # building a single LimitCall.
        if hit_set is None:
            hit_set = self.hit_set(list(hits))
        keys_ = hit_set.keys
        if not hit_set.distinct:
            return await self._check_merged(hits, keys_)  # counted by the check it makes
        reserves = self.reservations
        needs = hit_set.needs
        if reserves is not None and needs is not None:
            taken = reserves.take(needs, keys_, now)
            if taken is not None:
                self.stats.reserved += 1
                if hit_set.spends is None:
                    # Reserved for by another shape's store calls: this shape's next
                    # requests spend from them at once too (take_reserved).
                    hit_set.hold(taken)
                return _reserved_verdict(hits, taken, now)
        self.stats.asked += 1  # a check answered from reserves counts as `reserved` only
        cached: tuple[float, int] | None = None
        for i, (h, key) in enumerate(zip(hits, keys_, strict=True)):
            if h.rule.shadow or h.cost < 1 or h.rule.strategy == "concurrency":
                continue
            until = self._cache.denied_until(f"{key}#{h.rule.requests}", h.cost, now)
            if until is not None and (cached is None or until > cached[0]):
                cached = (until, i)  # the longest wait decides, as in _verdict
        if cached is not None:
            self.stats.cache_denied += 1
            verdict = self._cached_denial(hits, cached[1], cached[0] - now)
            hit_set.denied_until, hit_set.denial = cached[0], verdict
            return verdict
        token = f"{self._instance_id}:{next(self._seq)}"
        if reserves is None:
            calls = [self._call(h, token, h.cost) for h in hits]
        else:
            wants = reserves.wants(hits, keys_, now)
            calls = [self._call(h, token, h.cost, w) for h, w in zip(hits, wants, strict=True)]
        try:
            results = await self._store.acquire(calls)
        except StoreError as exc:
            if reserves is not None:
                reserves.settle(keys_, calls, None, now)
            return self._fallback(hits, calls, token, exc)
        except BaseException:
            if reserves is not None:
                reserves.settle(keys_, calls, None, now)
            raise
        if reserves is not None:
            reserves.settle(keys_, calls, results, now)
            if needs is not None:
                hit_set.hold(reserves.lookup(keys_))
        self._degraded = False
        if self._backlog:
            self._owed_to_store()
        taken = None
        if reserves is not None and needs is not None and not batch_admits(calls, results):
            # Units this instance reserved (perhaps in this very reply, for a request that was
            # ahead of this one) are counted already: spending them here rather than denying
            # keeps a burst from ending with units held that no later request comes to spend.
            taken = reserves.take(needs, keys_, now)
        if taken is not None:  # counted as asked: it made a store call
            verdict = _reserved_verdict(hits, taken, now)
        else:
            # Units this instance holds for these keys (this grant's and earlier ones) are
            # still its to spend: the remaining it reports counts them, as answers from
            # reserves do.
            holding = (
                None
                if reserves is None
                else [reserves.held(k, now, c.limit) for k, c in zip(keys_, calls, strict=True)]
            )
            verdict = self._verdict(hits, calls, results, token, degraded=False, holding=holding)
        for h, c, r in zip(hits, calls, results, strict=True):
            # A quota denial is cached until the period ends: only a new period (a new key) or
            # a larger plan (a new cache key, see _cache_key) can admit before that.
            cacheable = h.rule.strategy != "concurrency" and not h.rule.shadow and h.cost >= 1
            if cacheable and not r.allowed and r.retry_ms > 0:
                self._cache.put(_cache_key(c), now + r.retry_ms / 1000, h.cost)
        return verdict

    async def peek(self, hits: Sequence[Hit]) -> Verdict:
        """Current state of each hit's counter, consuming nothing (a cost-0 evaluation).

        Units this instance reserved and has not spent yet count as not used."""
        verdict = await self.check([dataclasses.replace(h, cost=0) for h in hits])
        if self.reservations is None or len(verdict.states) != len(hits):
            return verdict
        now = self.now()
        held = [self.reservations.held(self._key(h), now) for h in hits]
        if not any(held):
            return verdict
        states = tuple(
            dataclasses.replace(s, remaining=s.remaining + n, used=max(0, s.used - n))
            for s, n in zip(verdict.states, held, strict=True)
        )
        return dataclasses.replace(verdict, states=states)

    async def _check_merged(self, hits: Sequence[Hit], keys_: list[str]) -> Verdict:
        # Two hits on one key (the same rule matched twice) must count once with both costs:
        # stores evaluate a request's calls before committing any, so duplicates would not see
        # each other.
        first: dict[str, int] = {}
        merged: list[Hit] = []
        index: list[int] = []
        for h, k in zip(hits, keys_, strict=True):
            j = first.setdefault(k, len(merged))
            if j == len(merged):
                merged.append(h)
            else:
                merged[j] = dataclasses.replace(merged[j], cost=merged[j].cost + h.cost)
            index.append(j)
        v = await self.check(merged)
        return dataclasses.replace(v, states=tuple(v.states[j] for j in index))

    async def release(self, lease: Lease) -> None:
        """Free a lease's concurrency slots. Idempotent; never raises; survives cancellation."""
        if self._leases.pop(lease.token, None) is None:
            return
        if lease.local:
            self._local.release(lease.calls)
            return
        await self._shielded(self._release_remote(lease))

    def settle(self, lease: Lease | None, hits: Sequence[Hit], charge: int) -> asyncio.Task[None]:
        """After a response: free its lease, then debit `charge` more units (see charge()).

        One task that close() waits for, so that the caller may be cancelled (or the process
        shut down) at any point without leaking the slot or losing the usage.
        """
        return self._spawn(self._settle(lease, hits, charge))

    async def _settle(self, lease: Lease | None, hits: Sequence[Hit], charge: int) -> None:
        if lease is not None:
            await self.release(lease)
        await self.charge(hits, charge)

    async def charge(self, hits: Sequence[Hit], amount: int) -> None:
        """Debit `amount` more units after the response (e.g. AI tokens used). Never raises."""
        hits = [h for h in hits if h.rule.strategy != "concurrency"]
        if amount <= 0 or not hits:
            return
        token = f"{self._instance_id}:{next(self._seq)}"
        calls = [self._call(h, token, amount) for h in hits]
        await self._shielded(self._charge_remote(hits, calls))

    # ---- helpers --------------------------------------------------------------------------------

    def _call(self, hit: Hit, token: str, cost: int, extra: int = 0) -> LimitCall:
        rule = hit.rule
        template = self._templates.get(id(rule))
        if template is None or template[0] is not rule:
            template = self._template(rule)
        _, head, tail, window_ms, burst, period_end_ms = template
        return LimitCall(
            head + hit.subject + tail,
            rule.strategy,
            rule.requests,
            window_ms,
            burst,
            cost if cost > 0 else 0,
            rule.shadow,
            token,
            period_end_ms,
            extra,
        )

    def _key(self, hit: Hit) -> str:
        rule = hit.rule
        template = self._templates.get(id(rule))
        if template is None or template[0] is not rule:
            template = self._template(rule)
        return template[1] + hit.subject + template[2]

    def _template(self, rule: LimitRule) -> _Template:
        """What a rule contributes to every call, computed once per rule object."""
        head, tail = keys.limit_key_parts(self._prefix, rule)
        period_end_ms = round(rule.period_end * 1000) if rule.strategy == "quota" else 0
        template = (rule, head, tail, rule.window_ms, rule.ceiling, period_end_ms)
        if len(self._templates) >= 10_000:  # quota rules are made per key and period
            self._templates.clear()
        self._templates[id(rule)] = template
        return template

    def _verdict(
        self,
        hits: Sequence[Hit],
        calls: Sequence[LimitCall],
        results: Sequence[CallResult],
        token: str,
        *,
        degraded: bool,
        holding: Sequence[int] | None = None,
    ) -> Verdict:
        """`holding`: units this instance holds per call (reserved, not spent); else the grant."""
        allowed = batch_admits(calls, results)
        mine = holding if holding is not None else [r.granted for r in results]
        states = tuple(
            LimitState(
                name=h.rule.name,
                limit=c.burst,
                remaining=max(0, r.remaining) + n,
                reset_seconds=max(0, r.reset_ms) / 1000,
                allowed=r.allowed,
                shadow_denied=h.rule.shadow and not r.allowed,
                used=r.used - n if c.strategy == "quota" else r.used,
            )
            for h, c, r, n in zip(hits, calls, results, mine, strict=True)
        )
        self.stats.shadow_denied += sum(s.shadow_denied for s in states)
        if allowed:
            held = tuple(
                c
                for c, r in zip(calls, results, strict=True)
                if c.strategy == "concurrency" and r.allowed and c.cost > 0
            )
            lease = Lease(token, held, degraded) if held else None
            if lease is not None:
                self._hold(lease)
            return Verdict(True, "", states, None, degraded, lease)
        self.stats.denied += 1
        # The longest wait decides: retrying sooner would be denied by that limit again.
        retry_ms, strategy = max(
            (r.retry_ms, c.strategy)
            for c, r in zip(calls, results, strict=True)
            if not r.allowed and not c.shadow
        )
        return Verdict(False, _code(strategy), states, _retry_seconds(retry_ms), degraded, None)

    def _now_ms(self) -> int:
        return math.floor(self.now() * 1000)

    def _cached_denial(self, hits: Sequence[Hit], index: int, wait: float) -> Verdict:
        # Hits we did not evaluate report their full limit: nothing was consumed from them, and
        # the denying hit (remaining 0) is what the headers' most-restrictive choice will pick.
        states = tuple(
            LimitState(h.rule.name, h.rule.ceiling, 0, wait, False, False)
            if i == index
            else LimitState(h.rule.name, h.rule.ceiling, h.rule.ceiling, 0.0, True, False)
            for i, h in enumerate(hits)
        )
        self.stats.denied += 1
        code = _code(hits[index].rule.strategy)
        return Verdict(False, code, states, _retry_seconds(wait * 1000), False, None)

    def _fallback(
        self, hits: Sequence[Hit], calls: Sequence[LimitCall], token: str, exc: StoreError
    ) -> Verdict:
        """Answer without the store, per rule: enforce locally, let through, or refuse."""
        self._degraded = True
        self.stats.store_errors += 1
        self.stats.degraded += 1
        if not isinstance(exc, StoreUnavailable):
            log.error("rate-limit store misuse, answering from fallback: %s", exc)
        if any(h.rule.on_store_error == "closed" and not h.rule.shadow for h in hits):
            states = tuple(
                LimitState(h.rule.name, h.rule.ceiling, 0, 0.0, False, False) for h in hits
            )
            retry = _retry_seconds(self._settings.closed_retry_after_seconds * 1000)
            return Verdict(False, "store_unavailable", states, retry, True, None)
        wall_ms = math.floor(self._wall() * 1000)
        # Nothing is reserved from the fallback: its units are not the store's to give back.
        calls = [dataclasses.replace(c, extra=0) if c.extra else c for c in calls]
        view, results = self._local.acquire(hits, calls, self._now_ms(), wall_ms)
        verdict = self._verdict(hits, view, results, token, degraded=True)
        if verdict.allowed:
            self._owe(calls)
        return verdict

    # ---- concurrency leases outliving half their length ------------------------------------------

    def _hold(self, lease: Lease) -> None:
        """Keep a lease until release(), renewing it while its request runs.

        Why: a lease expires by itself so that a crashed instance cannot keep slots for good,
        but a request that runs longer than the lease (a streamed AI answer, a slow upload)
        would then lose its slot while still in flight, and one more request would be let in.
        """
        self._leases[lease.token] = (lease, self.now() + _half_lease(lease))
        if self._renewer is None and not self._closing:
            self._renewer = asyncio.create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        try:
            while self._leases:
                shortest = min(_half_lease(lease) for lease, _ in self._leases.values())
                # A lease is renewed between half and five eighths of its length.
                await asyncio.sleep(min(max(shortest / 4, 0.005), 5.0))
                try:
                    await self.renew_due()
                except Exception:  # a bug here must not stop renewing every lease for good
                    log.exception("renewing concurrency leases failed")
        finally:
            self._renewer = None

    async def _store_lost_data(self) -> None:
        """Redis came back empty: put the leases of requests in flight back now rather than at
        their next renewal (up to half a lease later), while new requests would take their
        slots. A task of the limiter's own, so that close() waits for it."""
        if self._closing:
            return
        for token, (lease, _) in list(self._leases.items()):
            if not lease.local:
                self._leases[token] = (lease, -math.inf)
        await asyncio.shield(self._spawn(self.renew_due()))

    async def renew_due(self) -> None:
        """Renew every lease past half its length (the loop above calls this; tests may)."""
        now = self.now()
        due = [lease for lease, due_at in self._leases.values() if due_at <= now]
        local = [lease for lease in due if lease.local]
        if local:
            self._local.renew([c for lease in local for c in lease.calls], self._now_ms())
            self._renewed(local, now)
        remote = [lease for lease in due if not lease.local]
        # In slices: leases granted together fall due together, and one script call must stay
        # small enough for the per-call budget (and must not hold Redis up).
        for start in range(0, len(remote), _RENEW_SLICE):
            # Leases released during an earlier slice's round trip are not renewed.
            part = [lease for lease in remote[start : start + _RENEW_SLICE] if self._holds(lease)]
            try:
                await self._store.renew([c for lease in part for c in lease.calls])
            except StoreError as exc:
                # Asked again on the next pass; a lease has half its length left for that.
                self.stats.renew_errors += 1
                if self.stats.renew_errors & (self.stats.renew_errors - 1) == 0:  # 1, 2, 4, 8...
                    log.warning("could not renew %d concurrency leases: %s", len(part), exc)
                return
            finally:
                # A renewal puts back a lease that is gone. One released while the renewal was
                # on its way (its reply lost, or not awaited any more) may have been put back
                # after its release, which travels on another connection: release it again.
                for lease in part:
                    if not self._holds(lease):
                        self._spawn(self._release_remote(lease))
            self._renewed(part, now)

    def _holds(self, lease: Lease) -> bool:
        return lease.token in self._leases

    def _renewed(self, leases: list[Lease], now: float) -> None:
        for lease in leases:
            if self._holds(lease):  # not released meanwhile
                self._leases[lease.token] = (lease, now + _half_lease(lease))
        self.stats.renewed += len(leases)

    async def _release_remote(self, lease: Lease) -> None:
        try:
            await self._store.release(lease.calls)
        except StoreError as exc:
            # The lease expires by itself after window_seconds; nothing leaks for good.
            self.stats.release_errors += 1
            log.warning("could not release concurrency lease: %s", exc)

    async def _charge_remote(self, hits: Sequence[Hit], calls: Sequence[LimitCall]) -> None:
        try:
            await self._store.charge(calls)
        except StoreError as exc:
            self.stats.charge_errors += 1
            log.warning("could not charge usage to the store: %s", exc)
            self._local.charge(hits, calls, self._now_ms())
            self._owe(calls)
            return
        if self._backlog:
            self._owed_to_store()

    # ---- quota units owed to the store after an outage ----------------------------------------

    def _owe(self, calls: Sequence[LimitCall]) -> None:
        """Queue the quota units of an admitted request the store could not count."""
        self.stats.quota_owed += sum(c.cost for c in calls if c.strategy == "quota")
        self._requeue(calls)

    def _requeue(self, calls: Sequence[LimitCall]) -> None:
        dropped = self._backlog.dropped_units
        self._backlog.add(calls)
        self.stats.quota_dropped += self._backlog.dropped_units - dropped

    def _owed_to_store(self) -> None:
        """The store answered again: charge what it is owed, once, in the background."""
        if self._closing or (self._settling is not None and not self._settling.done()):
            return
        self._settling = self._spawn(self._settle_backlog())

    async def _settle_backlog(self) -> None:
        owed = self._backlog.take()
        if not owed:
            return
        try:
            await self._store.charge(owed)
        except StoreError as exc:
            # Unknown outcome (e.g. a timeout after the script ran) is re-queued: charging a
            # unit twice is the lesser evil for billing than never charging it.
            self._requeue(owed)
            log.warning("could not charge %d owed quota counters yet: %s", len(owed), exc)
            return
        self.stats.quota_recharged += sum(c.cost for c in owed)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task that close() waits for."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        # Releases and charges run after the response, often from a task that is being cancelled
        # (client gone); shielding lets the store call finish instead of leaking the slot.
        await asyncio.shield(self._spawn(coro))

    async def _beat(self) -> None:
        try:
            live = await self._store.heartbeat(
                self._instance_id, self._settings.instance_ttl_seconds
            )
        except StoreError as exc:
            # Keep the last known count: during an outage it is the best estimate we have.
            self._degraded = True
            if isinstance(exc, StoreRefused) and not self._refused:
                # Credentials rotated under a running instance: say so once, loudly (the open
                # breaker's errors in between are not news), until a heartbeat gets through.
                log.error("the store refuses this instance (password or TLS): %s", exc)
                self._refused = True
            log.debug("heartbeat failed: %s", exc)
            return
        self._local.live_instances = max(1, live)
        self._degraded = self._refused = False
        if self._backlog:
            self._owed_to_store()

    # ---- reserved units not spent ---------------------------------------------------------------

    async def _give_back_loop(self) -> None:
        assert self.reservations is not None
        # Twice per reservation length: unspent units are back at most 1.5 x that after the grant.
        pause = self._settings.reserve_seconds / 2
        while not self._closing:
            await asyncio.sleep(pause)
            try:
                owed = self.reservations.expired(self.now())
                if owed:
                    # Shielded: close() cancels this loop, and units taken out of the reserves
                    # must reach the store (close waits for background tasks before draining).
                    await asyncio.shield(self._spawn(self._give_back(owed)))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the loop and let leftovers pile up
                log.exception("giving back reserved limit units failed")

    async def _give_back(self, owed: list[GiveBack]) -> None:
        if not owed:
            return
        try:
            await self._store.refund([c for c, _ in owed], [stamp for _, stamp in owed])
        except CircuitOpen:
            # Not even attempted: try again on the next round (quota units are billing data).
            assert self.reservations is not None
            self.reservations.owe_again(owed)
            return
        except StoreError as exc:
            # Outcome unknown (it may have run): never repeated, since giving back twice would
            # over-admit. Those units stay counted: until their window ends for rate limits,
            # for good for a quota (over-counted by at most one reservation).
            self.stats.give_back_errors += 1
            log.warning("could not give back %d reserved limit counters: %s", len(owed), exc)
            return
        self.stats.given_back += sum(c.cost for c, _ in owed)

    async def _heartbeat_loop(self) -> None:
        while not self._closing:  # also stops the loop if a cancel were ever lost in a store call
            await asyncio.sleep(self._settings.heartbeat_interval_seconds)
            await self._beat()


def _reserved_verdict(hits: Sequence[Hit], taken: Sequence[Reserve], now: float) -> Verdict:
    """Admitted from reserved units: what the store said at the grant, minus what we spent."""
    states = tuple(
        LimitState(
            h.rule.name,
            h.rule.ceiling,
            r.base + r.left,
            max(0.0, r.reset_at - now),
            True,
            False,
            r.used - r.left if h.rule.strategy == "quota" else 0,
        )
        for h, r in zip(hits, taken, strict=True)
    )
    return Verdict(True, "", states, None, False, None)


def _half_lease(lease: Lease) -> float:
    return min(c.window_ms for c in lease.calls) / 2000


def _code(strategy: Strategy) -> str:
    if strategy == "quota":
        return "quota_exceeded"
    return "concurrency_limited" if strategy == "concurrency" else "rate_limited"


def _cache_key(call: LimitCall) -> str:
    # The limit is part of the cache key: a plan upgraded mid-period must not stay denied until
    # the period ends (the storage key deliberately ignores the limit, see keys.quota_key).
    return f"{call.key}#{call.limit}"


def _retry_seconds(ms: float) -> float:
    # Whole seconds, at least 1, rounded up so that a client retrying after it is not early.
    return float(max(1, math.ceil(ms / 1000)))
