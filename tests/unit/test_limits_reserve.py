"""Units reserved ahead (limits/reserve.py) on a real Redis: fewer round trips, never more admitted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shieldproxy.limits import Hit, LimiterSettings, LimitRule, RateLimiter
from shieldproxy.limits.reserve import NOT_TAKEN, Reservations, Reserve
from shieldproxy.store.base import GRANT_SHARE
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
    first = Reserve(left=5, limit=1000, valid_until=now + 1, granted=5, demand=7)
    second = Reserve(left=5, limit=1000, valid_until=now + 1, granted=5, demand=7)
    third = Reserve(left=5, limit=1000, valid_until=now + 1, granted=5, demand=7)
    if short == "units":
        third.left = 1
    elif short == "expired":
        third.valid_until = now
    else:
        third.limit = 2000
    needs = [(2, 1000), (3, 1000), (2, 1000)]
    assert reserves.take_from([first, second, third], needs, now) == NOT_TAKEN
    assert [(r.left, r.demand) for r in (first, second)] == [(5, 7), (5, 7)]
    assert reserves.spent == 0
    third.left, third.valid_until, third.limit = 5, now + 1, 1000
    assert reserves.take_from([first, second, third], needs, now) != NOT_TAKEN
    assert [r.left for r in (first, second, third)] == [3, 2, 3]
    assert reserves.spent == 7
