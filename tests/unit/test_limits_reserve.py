"""Units reserved ahead (limits/reserve.py) on a real Redis: fewer round trips, never more admitted."""

from __future__ import annotations

import asyncio
import copy
import math
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldproxy.limits import Hit, LimiterSettings, LimitRule, RateLimiter
from shieldproxy.limits.reserve import (
    NOT_TAKEN,
    TAKEN_LOW,
    Reservations,
    Reserve,
    spends_of,
)
from shieldproxy.store.base import GRANT_SHARE, CallResult, LimitCall
from tests.limits_helpers import open_roomy, stored_count

pytestmark = pytest.mark.timeout(60)


def window_rule(name: str, requests: int, strategy: str = "fixed_window") -> LimitRule:
    return LimitRule(name, "key", strategy, requests, 3600)  # type: ignore[arg-type]


async def evalsha_calls(url: str) -> int:
    raw = aioredis.Redis.from_url(url)
    try:
        stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    finally:
        await raw.aclose()


async def test_busy_subject_is_admitted_from_reserved_units(redis_url: str, tmp_path: Path) -> None:
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store)
    r = window_rule("busy", 100_000)
    before = await evalsha_calls(redis_url)
    for i in range(2000):
        v = await limiter.check([Hit(r, "k1")])
        assert v.allowed
        # One instance: what it shows is exact, reserved units included.
        assert v.states[0].remaining == 100_000 - i - 1
    trips = await evalsha_calls(redis_url) - before
    assert trips < 100, f"{trips} store calls for 2000 requests"
    assert limiter.stats.reserved > 1900
    # The store counted every unit before it was spent, and at most one grant more.
    counted = await stored_count(redis_url, r, "k1")
    assert 2000 <= counted <= 2000 + 100_000 // GRANT_SHARE
    await limiter.close()  # gives back what it held
    assert await stored_count(redis_url, r, "k1") == 2000
    await store.close()


async def test_two_instances_never_admit_more_than_the_limit(
    redis_url: str, tmp_path: Path
) -> None:
    stores = [open_roomy(redis_url, tmp_path / str(i)) for i in range(2)]
    settings = LimiterSettings(reserve_min_limit=100)
    limiters = [RateLimiter(s, settings=settings) for s in stores]
    r = window_rule("shared", 300)
    admitted = 0
    for round_ in range(40):
        verdicts = await asyncio.gather(
            *(limiters[(round_ + i) % 2].check([Hit(r, "k")]) for i in range(25))
        )
        admitted += sum(v.allowed for v in verdicts)
        await asyncio.sleep(0.002)
    assert admitted <= 300
    # Under-admission is bounded by what the instances still hold at the end.
    assert admitted >= 300 - 2 * (300 // GRANT_SHARE)
    assert sum(lim.stats.reserved for lim in limiters) > 0, "nothing was reserved"
    for lim in limiters:
        await lim.close()
    assert await stored_count(redis_url, r, "k") == admitted
    for s in stores:
        await s.close()


async def test_unspent_units_go_back_when_the_reservation_ends(
    redis_url: str, tmp_path: Path
) -> None:
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=0.05))
    await limiter.start()
    r = window_rule("idle-after", 10_000, strategy="sliding_window")
    for _ in range(50):
        assert (await limiter.check([Hit(r, "k")])).allowed
    assert limiter.stats.reserved > 0
    assert await stored_count(redis_url, r, "k") > 50  # units are held
    for _ in range(100):
        await asyncio.sleep(0.02)
        if await stored_count(redis_url, r, "k") == 50:
            break
    assert await stored_count(redis_url, r, "k") == 50
    assert limiter.stats.given_back > 0
    await limiter.close()
    await store.close()


@pytest.mark.parametrize(
    ("strategy", "reserve_seconds"),
    [("sliding_log", 0.05), ("fixed_window", 0.0)],
    ids=["exact-log", "reservations-off"],
)
async def test_every_request_asks_the_store(
    redis_url: str, tmp_path: Path, strategy: str, reserve_seconds: float
) -> None:
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store, settings=LimiterSettings(reserve_seconds=reserve_seconds))
    r = window_rule("exact", 10_000, strategy=strategy)
    before = await evalsha_calls(redis_url)
    for _ in range(100):
        assert (await limiter.check([Hit(r, "k")])).allowed
    assert await evalsha_calls(redis_url) - before == 100
    assert limiter.stats.reserved == 0
    await limiter.close()
    await store.close()


async def test_a_request_with_an_exact_limit_is_never_served_locally(
    redis_url: str, tmp_path: Path
) -> None:
    """A reservable limit next to a sliding_log one: the log must see every request."""
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store)
    counter, log = window_rule("counter", 10_000), window_rule("log", 30, "sliding_log")
    verdicts = [await limiter.check([Hit(counter, "k"), Hit(log, "k")]) for _ in range(60)]
    assert sum(v.allowed for v in verdicts) == 30
    assert limiter.stats.reserved == 0
    await limiter.close()
    assert await stored_count(redis_url, counter, "k") == 30
    await store.close()


async def test_small_limits_are_never_reserved(redis_url: str, tmp_path: Path) -> None:
    store = open_roomy(redis_url, tmp_path)
    limiter = RateLimiter(store)  # default floor: 1,000 per window
    small = window_rule("small", 999)
    for _ in range(200):
        assert (await limiter.check([Hit(small, "k")])).allowed
    assert limiter.stats.reserved == 0
    assert await stored_count(redis_url, small, "k") == 200
    await limiter.close()
    await store.close()


@pytest.mark.parametrize("short", ["units", "expired", "other limit"])
def test_a_request_one_reserve_cannot_pay_for_spends_from_none(short: str) -> None:
    """take_from() spends in one pass and undoes it when a later reserve comes up short: the
    reserves before that one must read exactly as before, units and demand alike."""
    reserves = Reservations(horizon_seconds=1.0, max_units=100, max_entries=10)
    now = 50.0
    first = Reserve(left=5, limit=1000, valid_until=now + 1, full=5, demand=7)
    second = Reserve(left=5, limit=1000, valid_until=now + 1, full=5, demand=7)
    third = Reserve(left=5, limit=1000, valid_until=now + 1, full=5, demand=7)
    if short == "units":
        third.left = 1
    elif short == "expired":
        third.valid_until = now
    else:
        third.limit = 2000
    needs = [(2, 1000), (3, 1000), (2, 1000)]
    assert reserves.take_from(spends_of([first, second, third], needs), now) == NOT_TAKEN
    assert [(r.left, r.demand) for r in (first, second)] == [(5, 7), (5, 7)]
    third.left, third.valid_until, third.limit = 5, now + 1, 1000
    assert reserves.take_from(spends_of([first, second, third], needs), now) != NOT_TAKEN
    assert [r.left for r in (first, second, third)] == [3, 2, 3]


def test_a_steady_subject_holds_one_horizon_at_most_and_asks_twice_per_horizon() -> None:
    """A busy subject's reserve is topped up, not stacked: each refill once asked for a whole
    horizon's traffic, four times per horizon, so what one instance held (and no other could
    use) grew by three horizons' worth every horizon. Here the store answers at once."""
    horizon, rate = 0.1, 5000  # 500 units per horizon
    reserves = Reservations(horizon_seconds=horizon, max_units=10_000, max_entries=10)
    rule = window_rule("steady", 10**9, strategy="sliding_window")
    hits, keys, needs = [Hit(rule, "k")], ["k"], [(1, 10**9)]

    def grant(units: int, now: float) -> None:
        call = LimitCall("k", "sliding_window", 10**9, 60_000, 10**9, 0, False, "t", extra=units)
        reserves.settle(keys, [call], [CallResult(True, 10**8, 30_000, 0, granted=units)], now)

    refills, store_calls, most_held = 0, 0, 0
    for i in range(3 * rate):
        now = 1000.0 + i / rate
        found = reserves.lookup(keys)
        taken = NOT_TAKEN if found is None else reserves.take_from(spends_of(found, needs), now)
        if taken == NOT_TAKEN:
            store_calls += 1
            if (units := reserves.wants(hits, keys, now)[0]) > 0:
                grant(units, now)
        elif taken == TAKEN_LOW:
            assert found is not None
            for _, units in reserves.refill(found, now) or ():
                refills += 1
                grant(units, now)
        if i >= rate:  # past the first second: steady
            most_held = max(most_held, reserves.held("k", now))
    assert store_calls <= 3  # the first sightings only: then every request is served locally
    assert most_held <= rate * horizon + 1
    assert 3 / horizon * 2 * 0.9 <= refills <= 3 / horizon * 2 * 1.1  # twice per horizon


# One step in the life of three reserves: time passes, the limiter asks for more (wants or
# refill), a store answer lands (a grant, none, or a failed call), or a request spends.
_reserve_step = st.one_of(
    st.tuples(st.just("wait"), st.floats(0.0, 0.6, allow_nan=False)),
    st.tuples(st.just("ask"), st.integers(0, 2)),
    st.tuples(st.just("refill"), st.just(0)),
    st.tuples(
        st.just("grant"),
        st.integers(0, 2),
        st.integers(0, 40),  # units granted (0: the store had none to spare)
        st.integers(0, 3000),  # ms to the window's reset
        st.sampled_from([1000, 2000]),  # the limit it was granted under
        st.booleans(),  # the call failed
    ),
    st.tuples(st.just("spend"), st.integers(1, 3), st.sampled_from([1000, 2000])),
)


def _assert_marks_current(reserves: Reservations, r: Reserve) -> None:
    """A reserve's marks are what _mark makes of it now (or were never made: the full
    tests run then). A mark left stale after a change would let take_from() admit where
    _take() finds the reserve low, or send a request to _take() for nothing."""
    assert r.left_at_since >= r.left  # what was spent since the last ask is never negative
    if r.quick_until == -math.inf:
        assert r.floor == 0
        return
    if r.asking:  # a refill is on its way: only running out (or out of time) matters
        assert (r.floor, r.quick_until) == (0, r.valid_until)
        return
    # The least `left` that is not low (2 * left >= full), and the time it runs low.
    assert 2 * r.floor >= r.full > 2 * (r.floor - 1)
    early = 0.5  # half of the one-second horizon
    assert r.quick_until == (r.valid_until if r.capped else r.valid_until - early)


@settings(max_examples=300, deadline=None)
@given(st.lists(_reserve_step, min_size=1, max_size=60))
def test_the_quick_spend_is_the_full_one(steps: list[tuple[object, ...]]) -> None:
    """take_from() decides from two numbers per reserve (Reservations._mark) what _take()
    works out in full: whatever asks, grants and failures came before, both must answer
    alike and leave every reserve alike."""
    reserves = Reservations(horizon_seconds=1.0, max_units=50, max_entries=10)
    rules = [window_rule(f"r{i}", 1000) for i in range(3)]
    keys = [f"k{i}" for i in range(3)]
    now = 100.0
    for _ in range(2):  # two sightings: the second asks for units (a rate is known)
        reserves.wants([Hit(rule, "s") for rule in rules], keys, now)
        now += 0.1
    for step in steps:
        for r in reserves._entries.values():
            _assert_marks_current(reserves, r)
        kind = step[0]
        if kind == "wait":
            now += float(step[1])  # type: ignore[arg-type]
        elif kind == "ask":
            index = int(step[1])  # type: ignore[call-overload]
            reserves.wants([Hit(rules[index], "s")], [keys[index]], now)
        elif kind == "refill":
            found = reserves.lookup(keys)
            if found is not None:
                reserves.refill(found, now)
        elif kind == "grant":
            _, index, units, reset_ms, limit, failed = step
            call = LimitCall(
                keys[index], "fixed_window", limit, 3_600_000, limit, 0, False, "t", extra=units
            )  # type: ignore[arg-type]
            result = CallResult(True, 500, reset_ms, 0, granted=units)  # type: ignore[arg-type]
            reserves.settle([keys[index]], [call], None if failed else [result], now)
        else:
            _, cost, limit = step
            found = reserves.lookup(keys)
            if found is None:
                continue
            needs = [(cost, limit)] * 3  # type: ignore[list-item]
            twin, twin_found = copy.deepcopy((reserves, found))
            expected = twin._take(spends_of(twin_found, needs), now)
            assert reserves.take_from(spends_of(found, needs), now) == expected
            assert [(r.left, r.demand) for r in found] == [(r.left, r.demand) for r in twin_found]
