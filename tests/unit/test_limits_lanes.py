"""Request shapes reused (HitSet, rate-limit lanes) and reserves refilled in the background:
fewer store calls, the same answers and headers, never more admitted than the limit."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp.test_utils import make_mocked_request

from shieldproxy.checks.rate_limit import RateLimitCheck
from shieldproxy.config import Config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.limits import Hit, LimiterSettings, LimitRule, RateLimiter, Strategy
from shieldproxy.limits.engine import ALLOWED_FROM_RESERVES
from shieldproxy.routes import RouteTable
from shieldproxy.store import Store, open_store
from shieldproxy.store.base import GRANT_SHARE
from tests.limits_helpers import open_roomy, stored_count

# Real servers: a hang must fail the test, never stall the suite.
pytestmark = pytest.mark.timeout(10)

# Windows are aligned to epoch time: an hour-long one makes crossing an edge mid-test rare, and
# clear_of_window_edge() waits out the rest, so counts and "remaining" stay in one window.
WINDOW = 3600.0


class Closable(Protocol):
    async def close(self) -> None: ...


@pytest.fixture
async def closing() -> AsyncIterator[list[Closable]]:
    """What a test opened, closed again at teardown even when the test failed: a socket left
    open would fail some later test instead (warnings are errors). Closing twice is harmless."""
    opened: list[Closable] = []
    yield opened
    for thing in reversed(opened):
        await thing.close()


async def clear_of_window_edge(margin: float = 3.0) -> None:
    """Wait out a window edge less than `margin` seconds away (Redis TIME is this host's time)."""
    into = time.time() % WINDOW
    if into > WINDOW - margin:
        await asyncio.sleep(WINDOW - into + 0.05)


async def counted_by_a_fresh_limiter(store: Store, rule: LimitRule, subject: str) -> int:
    """Units the store counts for this window, read by a cost-0 peek of a limiter holding none."""
    fresh = RateLimiter(store, settings=LimiterSettings(reserve_seconds=0))
    verdict = await fresh.peek([Hit(rule, subject)])
    await fresh.close()
    return rule.requests - verdict.states[0].remaining


async def test_refills_keep_a_busy_subject_on_its_reserves(
    redis_url: str, tmp_path: Path, closing: list[Closable]
) -> None:
    """Without refills a reserve runs dry (or ends) every grant, and the request that finds it so
    waits for the store; refilled in the background at half, it almost never does. And every unit
    reserved is either spent or given back: the store ends up counting exactly what was admitted."""
    await clear_of_window_edge()
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=0.05))
    closing += [store, limiter]
    await limiter.start()  # the give-back sweeper runs alongside the refills, as in production
    rule = LimitRule("busy-refill", "key", "sliding_window", 10**6, WINDOW)
    hs = limiter.hit_set([Hit(rule, "k")])
    total, admitted, to_store = 2000, 0, 0
    for i in range(total):
        if limiter.take_reserved(hs, limiter.now()):
            admitted += 1
        else:
            to_store += 1
            verdict = await limiter.check(hs.hits, hs)
            assert verdict.allowed
            admitted += 1
        if i % 2:
            await asyncio.sleep(0.0005)  # ~1 s in all: some 20 reservation lengths
    assert admitted == total
    assert limiter.stats.checks == total  # each request counted once, whichever path took it
    exported = limiter.stats.counts()  # what /metrics shows
    assert exported["checks"] == total and exported["reserved"] == total - to_store
    assert "asked" not in exported
    assert limiter.stats.refills > 0, "no reserve was ever refilled"
    # Here about 2 (the first sighting, the first grant); without refills some 25, one per
    # reservation length.
    assert to_store <= 10, f"{to_store} of {total} requests waited for the store"
    await limiter.close()  # waits for refills in flight, then gives back what it held
    assert await stored_count(redis_url, rule, "k") == admitted
    assert await counted_by_a_fresh_limiter(store, rule, "k") == admitted


async def test_closing_during_a_give_back_loses_nothing(
    redis_url: str, tmp_path: Path, closing: list[Closable]
) -> None:
    """Shutdown must not lose reserved units whose give-back is in flight: for a rate limit they
    would stay counted until the window ends, for a quota for good (billing data)."""
    await clear_of_window_edge()
    store = open_roomy(redis_url, tmp_path)
    in_flight = asyncio.Event()
    real_refund = store.refund

    async def slow_refund(calls: Any, stamps: Any) -> None:
        in_flight.set()
        await asyncio.sleep(0.05)  # a slow network: the give-back is under way a while
        await real_refund(calls, stamps)

    store.refund = slow_refund  # type: ignore[method-assign]
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=0.05))
    closing += [store, limiter]
    await limiter.start()
    rule = LimitRule("close-race", "key", "fixed_window", 100_000, WINDOW)
    hs = limiter.hit_set([Hit(rule, "k")])
    for _ in range(50):
        if not limiter.take_reserved(hs, limiter.now()):
            assert (await limiter.check(hs.hits, hs)).allowed
    assert await stored_count(redis_url, rule, "k") > 50  # units are held
    await asyncio.wait_for(in_flight.wait(), 2)  # the reserve ended; its give-back is under way
    await limiter.close()
    assert await stored_count(redis_url, rule, "k") == 50


@pytest.mark.parametrize("strategy", ["fixed_window", "sliding_window"])
@pytest.mark.parametrize("pause", [0.0, 0.002], ids=["flat-out", "paced"])
async def test_two_instances_refilling_never_admit_more_than_the_limit(
    redis_url: str, tmp_path: Path, closing: list[Closable], strategy: Strategy, pause: float
) -> None:
    """Refills are store calls too: whatever two instances reserve, spend, refill and give back
    while hammering one subject, the store never admits past the limit and, once both are closed,
    counts exactly the requests admitted. Paced, the run outlasts several reservation lengths, so
    reserves are also refilled for time running out, not only for units spent."""
    await clear_of_window_edge()
    limit = 1000
    settings = LimiterSettings(reserve_seconds=0.05, reserve_min_limit=100)
    stores = [open_roomy(redis_url, tmp_path / str(i)) for i in range(2)]
    limiters = [RateLimiter(s, settings=settings) for s in stores]
    closing += [*stores, *limiters]
    for lim in limiters:
        await lim.start()
    rule = LimitRule(f"shared-{strategy}", "key", strategy, limit, WINDOW)
    hit_sets = [lim.hit_set([Hit(rule, "k")]) for lim in limiters]
    admitted = [0, 0]
    deadline = time.monotonic() + 5

    async def client(n: int) -> None:
        """One of several concurrent requesters of instance n % 2, sharing its HitSet as the
        requests of one lane do; stops after a run of denials."""
        i = n % 2
        lim, hs = limiters[i], hit_sets[i]
        denials = 0
        while denials < 20 and time.monotonic() < deadline:
            if lim.take_reserved(hs, lim.now()) or (await lim.check(hs.hits, hs)).allowed:
                admitted[i] += 1
                denials = 0
            else:
                denials += 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(client(n) for n in range(8)))
    total = sum(admitted)
    assert total <= limit
    # Under-admission is bounded by what instances held when they were denied (a grant or so).
    assert total >= limit - 4 * (limit // GRANT_SHARE)
    assert sum(lim.stats.refills for lim in limiters) > 0, "nothing was refilled"
    assert all(lim.stats.denied > 0 for lim in limiters)
    for lim in limiters:
        await lim.close()
    assert await stored_count(redis_url, rule, "k") == total
    assert await counted_by_a_fresh_limiter(stores[0], rule, "k") == total


class ManualClock:
    """The limiter's (and local store's) clock, moved by the test: which second a denial falls
    in, and what every "t" reads, is then certain."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


# On the local store's clock 10,000 s is 40 s into a 60 s window: every "t" below reads 20.
START = 10_000.0
PER_IP, PER_KEY = 300, 5000
KeyLimits = tuple[tuple[LimitRule, str | None], ...]


def lane_config(*, route_limit: bool) -> Config:
    route: dict[str, Any] = {"name": "items", "path": "/v1/items/*"}
    if route_limit:
        route["limits"] = [
            {"name": "items-per-key", "scope": "key", "strategy": "fixed_window",
             "requests": PER_KEY, "window_seconds": 60},
        ]  # fmt: skip
    per_ip = {"name": "per-ip", "scope": "ip", "strategy": "sliding_window",
              "requests": PER_IP, "window_seconds": 60}  # fmt: skip
    return Config.model_validate({"limits": [per_ip], "routes": [route]})


class Lanes:
    """A RateLimitCheck on the local store, both on one manual clock, and a way to send it
    requests shaped as the pipeline leaves them (client, route and key resolved)."""

    def __init__(self, tmp_path: Path, config: Config) -> None:
        self.clock = ManualClock(START)
        self.store = open_store("local", data_dir=tmp_path, clock=self.clock)
        # Limits of a few hundred are reserved for too (the default floor is 1,000).
        settings = LimiterSettings(reserve_seconds=0.05, reserve_min_limit=100)
        self.limiter = RateLimiter(self.store, clock=self.clock, settings=settings)
        self.check = RateLimitCheck(config, self.limiter)
        self.route = RouteTable(config.routes).match("GET", "/v1/items/42")
        assert self.route is not None
        self.request = make_mocked_request("GET", "/v1/items/42")

    async def send(
        self, extra: KeyLimits = (), tick: float = 0.00001
    ) -> tuple[Decision, RequestContext]:
        self.clock.t += tick
        ctx = RequestContext(self.request, "rid", 0.0)
        ctx.client_ip, ctx.route, ctx.key_id = "203.0.113.7", self.route, "k1"
        ctx.extra_limits = extra
        decision = self.check.decide(ctx)
        if not isinstance(decision, Decision):
            decision = await decision  # the store answers
        # Between requests a server's loop runs other tasks: here, the refills they spawned
        # (the local store answers without ever suspending).
        await asyncio.sleep(0)
        return decision, ctx

    async def close(self) -> None:
        await self.limiter.close()
        await self.store.close()


def admitted_headers(n: int, *, route_limit: bool) -> list[tuple[str, str]]:
    """Headers of the n-th admitted request (from 1), however it was admitted: one instance on a
    clock that barely moves, so every limit counts down exactly and resets in 20 s."""
    policy, current = '"per-ip";q=300;w=60', f'"per-ip";r={PER_IP - n};t=20'
    if route_limit:
        policy += ', "items-per-key";q=5000;w=60'
        current += f', "items-per-key";r={PER_KEY - n};t=20'
    return [
        ("RateLimit-Policy", policy),
        ("RateLimit", current),
        ("X-RateLimit-Limit", "300"),
        ("X-RateLimit-Remaining", str(PER_IP - n)),
        ("X-RateLimit-Reset", "20"),
    ]


def via(ctx: RequestContext) -> str:
    return "reserves" if ctx.limit_verdict is ALLOWED_FROM_RESERVES else "store"


async def test_answers_from_reserves_read_as_answers_from_the_store(
    tmp_path: Path, closing: list[Closable]
) -> None:
    """A lane admits from reserves with headers it formats itself: they must be the store path's
    headers to the character (remaining counting down by one); and once the limit is reached, a
    denial kept by the lane is handed out again, identical, while each one is still counted."""
    lanes = Lanes(tmp_path, lane_config(route_limit=False))
    closing.append(lanes)
    limiter = lanes.limiter
    paths: list[str] = []
    for n in range(1, PER_IP + 1):
        decision, ctx = await lanes.send()
        assert decision is ALLOW, n
        paths.append(via(ctx))
        assert ctx.added_headers() == admitted_headers(n, route_limit=False), (n, paths[-1])
    assert paths.count("store") >= 2, "the first requests of a shape go to the store"
    assert paths.count("reserves") > PER_IP // 2, "a busy lane is admitted from reserves"
    assert limiter.stats.refills > 0

    denials: list[Decision] = []
    for _ in range(10):
        before = limiter.stats.denied
        decision, ctx = await lanes.send()
        assert limiter.stats.denied == before + 1, "each denial is counted"
        assert ctx.limit_verdict is not None and not ctx.limit_verdict.allowed
        assert ctx.limit_hits is not None and len(ctx.limit_hits) == 1
        denials.append(decision)
    first = denials[0]
    assert (first.allowed, first.status, first.code) == (False, 429, "rate_limited")
    headers = dict(first.headers)
    assert headers["RateLimit-Policy"] == '"per-ip";q=300;w=60'
    assert headers["X-RateLimit-Remaining"] == "0"
    retry = int(headers["Retry-After"])
    assert 1 <= retry <= 21
    # The store's denial, then the over-limit cache's, which the lane keeps: from then on, within
    # the same second, the very same answer.
    assert dict(denials[1].headers)["Retry-After"] == str(retry)
    assert all(d is denials[1] for d in denials[2:])
    assert limiter.stats.cache_denied == 9

    decision, _ = await lanes.send(tick=1.0)  # a second later the headers differ: a new answer
    assert not decision.allowed and decision is not denials[1]
    assert int(dict(decision.headers)["Retry-After"]) == retry - 1
    assert limiter.stats.denied == 11


async def test_remaining_counts_down_by_one_with_two_limits(
    tmp_path: Path, closing: list[Closable]
) -> None:
    """The same as above with a second, larger limit on the route: when the small limit's reserve
    is dry (near its end, no grant is possible) the request goes to the store, and the large
    limit's remaining must still be what the reserves path would show."""
    lanes = Lanes(tmp_path, lane_config(route_limit=True))
    closing.append(lanes)
    for n in range(1, PER_IP + 1):
        decision, ctx = await lanes.send()
        assert decision is ALLOW, n
        assert ctx.added_headers() == admitted_headers(n, route_limit=True), (n, via(ctx))


def key_limits(name: str, requests: int) -> KeyLimits:
    return ((LimitRule(name, "key", "sliding_window", requests, 60), None),)


def rate_limit_fields(headers: list[tuple[str, str]] | None) -> tuple[str, dict[str, int]]:
    """(RateLimit-Policy, remaining by policy name) of one admitted response."""
    assert headers is not None
    found = dict(headers)
    remaining = {
        m["name"]: int(m["r"])
        for m in re.finditer(r'"(?P<name>[^"]+)";r=(?P<r>\d+);t=\d+', found["RateLimit"])
    }
    return found["RateLimit-Policy"], remaining


@pytest.mark.parametrize(
    ("before", "after"),
    [(("key-own", 2000), ("key-own-gold", 4000)), (("key-own", 2000), ("key-own", 4000))],
    ids=["renamed", "raised"],
)
async def test_a_changed_key_limit_gets_a_new_lane(
    tmp_path: Path, closing: list[Closable], before: tuple[str, int], after: tuple[str, int]
) -> None:
    """Lanes are found by the identity of the key's limits: a key whose own limit changed (a new
    tuple from the key registry) is answered under the new rule at once, including by requests
    admitted from reserves, never with the old lane's header text."""
    lanes = Lanes(tmp_path, lane_config(route_limit=False))
    closing.append(lanes)
    stats = lanes.limiter.stats
    old_policy = f'"per-ip";q=300;w=60, "{before[0]}";q={before[1]};w=60'
    new_policy = f'"per-ip";q=300;w=60, "{after[0]}";q={after[1]};w=60'

    async def send_many(extra: KeyLimits, count: int) -> list[tuple[str, dict[str, int]]]:
        out = []
        for _ in range(count):
            decision, ctx = await lanes.send(extra, tick=0.001)
            assert decision is ALLOW
            out.append(rate_limit_fields(ctx.added_headers()))
        return out

    seen = await send_many(key_limits(*before), 60)
    assert all(policy == old_policy for policy, _ in seen)
    assert stats.reserved > 0
    reserved = stats.reserved
    seen = await send_many(key_limits(*after), 60)
    for policy, remaining in seen:
        assert policy == new_policy
        assert set(remaining) == {"per-ip", after[0]}
        # Counted against the new limit (under the old one at most 2000 could be left).
        assert before[1] < remaining[after[0]] < after[1]
    assert stats.reserved > reserved, "the new lane is admitted from reserves too"
    # An equal tuple that is a new object (the key read again) is a new lane, not a wrong one.
    seen = await send_many(key_limits(*after), 10)
    assert all(policy == new_policy for policy, _ in seen)


@pytest.mark.parametrize("step", [0.0005, 0.0003, 0.00037])
async def test_a_refill_is_never_spent_past_its_window(
    tmp_path: Path, closing: list[Closable], step: float
) -> None:
    """Units counted in one fixed window must not be spent once the next has opened (they would
    not be counted there: over-admission). A refill's reply arrives after the store measured the
    window's end, so its validity must be counted from before the call; and the store rounds
    the time to the end up to a whole millisecond, which must not stretch the validity (steps
    off the millisecond grid catch that)."""
    clock = ManualClock(START)  # 40 s into a 60 s window: it ends at START + 20
    store = open_store("local", data_dir=tmp_path, clock=clock)
    real_acquire = store.acquire

    async def slow_acquire(calls: Any) -> Any:
        results = await real_acquire(calls)
        clock.t += 0.01  # the reply takes 10 ms to come back
        return results

    store.acquire = slow_acquire  # type: ignore[method-assign]
    settings = LimiterSettings(reserve_seconds=0.05, reserve_min_limit=100)
    limiter = RateLimiter(store, clock=clock, settings=settings)
    closing += [limiter, store]
    rule = LimitRule("edge", "key", "fixed_window", 100_000, 60)
    hs = limiter.hit_set([Hit(rule, "k")])
    end = START + 20
    clock.t = end - 0.3
    spent_late = 0
    while clock.t < end + 0.1:
        clock.t += step
        if limiter.take_reserved(hs, clock.t):
            assert hs.reserves  # what was spent from
            if clock.t >= end:
                # Spent in the new window: only units that window counted may be.
                assert all(r.stamp >= end * 1000 for r in hs.reserves), clock.t - end
                spent_late += 1
        else:
            assert (await limiter.check(hs.hits, hs)).allowed
        await asyncio.sleep(0)  # refills run
    assert limiter.stats.refills > 0
    assert spent_late > 0  # the new window's reserves were used too


async def test_a_shape_served_from_reserves_another_shape_got_spends_from_them_at_once(
    tmp_path: Path, closing: list[Closable]
) -> None:
    """Two shapes (HitSets) over the same keys: the first makes the store calls that reserve,
    and the second's first check is answered from those reserves. From then on the second
    spends from them without a check of its own (take_reserved), instead of running the slower
    check() path until its reserves ran dry."""
    store = open_store("local", data_dir=tmp_path)
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=60.0))
    closing += [store, limiter]
    rule = LimitRule("shared", "key", "fixed_window", 10**6, WINDOW)
    first = limiter.hit_set([Hit(rule, "k")])
    for _ in range(3):  # a first sighting, then a grant: the key is reserved for
        assert (await limiter.check(first.hits, first)).allowed
    assert limiter.take_reserved(first, limiter.now())
    second = limiter.hit_set([Hit(rule, "k")])
    assert limiter.take_reserved(second, limiter.now()) is None  # nothing known about it yet
    checks, asked = limiter.stats.checks, limiter.stats.asked
    assert (await limiter.check(second.hits, second)).allowed  # from the reserves
    assert limiter.take_reserved(second, limiter.now())
    # Each request counted once, as answered from reserves (it made no store call).
    assert (limiter.stats.checks, limiter.stats.asked) == (checks + 2, asked)


async def test_every_check_is_counted_once_whichever_path_answers_it(
    tmp_path: Path, closing: list[Closable]
) -> None:
    """`checks` (exported to /metrics) counts requests: one that matched the same rule twice
    (its hits merged into one check) and one admitted from units reserved by the very store
    call it made are each one check, not two."""
    store = open_store("local", data_dir=tmp_path)
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=60.0))
    closing += [store, limiter]
    rule = LimitRule("twice", "key", "fixed_window", 10**6, WINDOW)
    for n in range(1, 6):
        assert (await limiter.check([Hit(rule, "k"), Hit(rule, "k")])).allowed
        assert limiter.stats.checks == n
    other = LimitRule("once", "key", "fixed_window", 10**6, WINDOW)
    hs = limiter.hit_set([Hit(other, "k")])
    for n in range(6, 12):
        if not limiter.take_reserved(hs, limiter.now()):
            assert (await limiter.check(hs.hits, hs)).allowed
        assert limiter.stats.checks == n
    assert limiter.stats.reserved > 0
