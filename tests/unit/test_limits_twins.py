"""The Python twins at window edges (fake clock), and their agreement with limits.lua."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shieldproxy.limits import LimitRule
from shieldproxy.limits.algorithms import MemoryCounters
from shieldproxy.limits.keys import limit_key
from shieldproxy.store import CallResult, LimitCall, open_store
from shieldproxy.store.redis import RedisStore
from tests.fixtures.redis_servers import RedisServer

# Real servers: a hang must fail this test, never stall the suite.
pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_040_000  # ms, on a 60 s boundary


def call(strategy: str, limit: int, window_ms: int, *, cost: int = 1, burst: int | None = None,
         token: str = "t", shadow: bool = False, key: str | None = None) -> LimitCall:  # fmt: skip
    return LimitCall(
        key or f"k:{strategy}",
        strategy,
        limit,
        window_ms,
        burst or limit,
        cost,
        shadow,
        token,  # type: ignore[arg-type]
    )


def test_fixed_window_resets_exactly_at_the_edge() -> None:
    m = MemoryCounters()
    c = call("fixed_window", 2, 1000)
    assert [m.acquire([c], T0 + 10)[0].remaining for _ in range(2)] == [1, 0]
    r = m.acquire([c], T0 + 999)[0]
    assert (r.allowed, r.retry_ms, r.reset_ms) == (False, 1, 1)
    assert m.acquire([c], T0 + 1000)[0] == CallResult(True, 1, 1000, 0, T0 + 1000)


def test_sliding_window_retry_is_the_first_admitting_ms() -> None:
    m = MemoryCounters()
    c = call("sliding_window", 4, 1000)
    for _ in range(4):
        assert m.acquire([c], T0 + 500)[0].allowed
    assert m.acquire([c], T0 + 1250)[0].allowed  # previous 4 weigh 4 * 0.75 = 3
    denied = m.acquire([c], T0 + 1250)[0]
    assert not denied.allowed and denied.retry_ms > 0
    at = T0 + 1250 + denied.retry_ms
    assert not m.acquire([c], at - 1)[0].allowed
    assert m.acquire([c], at)[0].allowed


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 50),  # limit
    st.integers(0, 50),  # units counted in the previous window
    st.integers(0, 50),  # ...and in the current one, before the request
    st.integers(1, 5),  # its cost
    st.integers(0, 999),  # ms into the current window
)
def test_sliding_window_admits_exactly_when_the_weighted_count_leaves_room(
    limit: int, prev: int, cur: int, cost: int, elapsed: int
) -> None:
    """The weighted estimate is the previous window's count times the share of it still
    inside the sliding window, rounded up, plus the current count; a request is admitted
    when its cost fits under the limit on top, and a denial's retry_ms is the first ms that
    admits (never a ms too early, never one too late)."""
    m = MemoryCounters()
    window = 1000
    seed = call("sliding_window", 10**6, window)  # the same key, a limit nothing reaches
    if prev:
        m.acquire([dataclasses.replace(seed, cost=prev)], T0 - window)
    if cur:
        m.acquire([dataclasses.replace(seed, cost=cur)], T0)
    c = call("sliding_window", limit, window, cost=cost)
    now = T0 + elapsed
    weighted = -(-prev * (window - elapsed) // window) + cur  # exact ceiling
    result = m.acquire([c], now)[0]
    assert result.allowed == (weighted + cost <= limit)
    if result.allowed:
        return
    at = now + result.retry_ms
    if at - 1 >= now:
        assert not m.acquire([c], at - 1)[0].allowed
    assert m.acquire([c], at)[0].allowed or cost > limit


@pytest.mark.parametrize("strategy", ["sliding_log", "token_bucket", "concurrency"])
def test_retry_ms_is_exact(strategy: str) -> None:
    m = MemoryCounters()
    c = call(strategy, 3, 900)
    for i in range(3):
        assert m.acquire([c], T0 + i * 10)[0].allowed
    denied = m.acquire([c], T0 + 30)[0]
    assert not denied.allowed
    at = T0 + 30 + denied.retry_ms
    assert not m.acquire([c], at - 1)[0].allowed
    assert m.acquire([c], at)[0].allowed


def test_memory_is_bounded_and_swept() -> None:
    m = MemoryCounters(max_entries=50)
    for i in range(500):
        m.acquire([call("fixed_window", 5, 1000, key=f"k{i}")], T0)
    assert len(m) == 50
    for i in range(200):  # after expiry every call sweeps a few dead entries
        m.acquire([call("fixed_window", 5, 1000, key="live")], T0 + 5000 + i)
    assert len(m) == 1


# ---- Lua vs Python on random request sequences --------------------------------------------


@dataclass(frozen=True)
class Op:
    advance_ms: int
    kind: str  # acquire | charge | release | renew | refund
    rules: tuple[int, ...]
    cost: int
    subject: int
    extra: int  # units asked to reserve beyond cost (granted only from limits >= 16)


STRATEGIES = [
    "fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency", "quota",
]  # fmt: skip

rule_st = st.builds(
    lambda s, n, w, b, shadow, end: LimitRule(
        f"r{s}{n}{w}{b}{shadow}{end}", "ip", s, n, w, b, shadow, period_end=end
    ),
    st.sampled_from(STRATEGIES),
    st.one_of(st.integers(1, 5), st.sampled_from([20, 50])),
    st.sampled_from([1.0, 1.5, 2.0, 3.0]),
    st.one_of(st.none(), st.integers(1, 8), st.just(40)),
    st.booleans(),
    # a quota period ending inside the run, or far away
    st.sampled_from([T0 / 1000 + 20, T0 / 1000 + 86_400 * 30]),
)
op_st = st.builds(
    Op,
    st.one_of(st.just(0), st.integers(0, 400), st.integers(0, 3500)),
    st.sampled_from(["acquire"] * 6 + ["charge", "release", "renew", "refund"]),
    st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True).map(tuple),
    st.integers(0, 3),
    st.integers(0, 1),
    st.one_of(st.just(0), st.integers(0, 8)),
)


@pytest.mark.slow
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rules=st.lists(rule_st, min_size=4, max_size=4, unique_by=lambda r: r.name),
    ops=st.lists(op_st, min_size=1, max_size=40),
)
def test_lua_and_python_twins_agree(
    redis_server: RedisServer, tmp_path: Path, rules: list[LimitRule], ops: list[Op]
) -> None:
    asyncio.run(_agree(redis_server.url, tmp_path, rules, ops))


async def _agree(url: str, tmp_path: Path, rules: list[LimitRule], ops: list[Op]) -> None:
    now = [T0]
    twin = MemoryCounters()
    store = open_store(url, data_dir=tmp_path, fake_time=lambda: now[0] / 1000, timeout_seconds=5)
    assert isinstance(store, RedisStore)
    raw = aioredis.Redis.from_url(url)
    await raw.flushall()
    held: list[list[LimitCall]] = []
    released: list[list[LimitCall]] = []
    reserved: list[tuple[LimitCall, int]] = []  # granted units, to give back, with their stamp
    try:
        for n, op in enumerate(ops):
            now[0] += op.advance_ms
            calls = [
                LimitCall(
                    limit_key("sp:", rules[i], str(op.subject)),
                    rules[i].strategy,
                    rules[i].requests,
                    rules[i].window_ms,
                    rules[i].ceiling,
                    op.cost,
                    rules[i].shadow,
                    f"tok{n}",
                    round(rules[i].period_end * 1000),
                    op.extra,
                )
                for i in op.rules
            ]
            if op.kind == "acquire":
                expected = twin.acquire(calls, now[0])
                got = await store.acquire(calls)
                assert got == expected, (n, op, calls)
                if all(r.allowed or c.shadow for c, r in zip(calls, got, strict=True)):
                    held.append([c for c, r in zip(calls, got, strict=True) if r.allowed])
                    reserved += [
                        (dataclasses.replace(c, cost=r.granted, extra=0), r.stamp)
                        for c, r in zip(calls, got, strict=True)
                        if r.granted
                    ]
            elif op.kind == "refund":
                if reserved:
                    c, stamp = reserved.pop(0)
                    twin.refund([c], [stamp], now[0])
                    await store.refund([c], [stamp])
            elif op.kind == "charge":
                twin.charge(calls, now[0])
                await store.charge(calls)
            elif op.kind == "renew":
                # The oldest lease still held (it may have expired meanwhile), or every other
                # time one released already (a renewal that crossed its release puts it back).
                pool = released if released and n % 2 else held
                if pool:
                    twin.renew(pool[0], now[0])
                    await store.renew(pool[0])
            elif held:
                twin.release(held[0])
                await store.release(held[0])
                released.append(held.pop(0))
    finally:
        await raw.aclose()
        await store.close()


def test_quota_counts_until_the_period_ends_and_bills_overage() -> None:
    m = MemoryCounters()
    end = T0 + 5000
    q = LimitCall("k:q", "quota", 2, 30_000, 2, 1, False, "t", end)
    assert [m.acquire([q], T0 + 1000)[0] for _ in range(2)] == [
        CallResult(True, 1, 4000, 0, 0, 1),
        CallResult(True, 0, 4000, 0, 0, 2),
    ]
    assert m.acquire([q], T0 + 2000)[0] == CallResult(False, 0, 3000, 3000, 0, 2)
    over = LimitCall("k:q", "quota", 2, 30_000, 2, 1, True, "t", end)  # overage "allow"
    assert m.acquire([over], T0 + 2000)[0] == CallResult(False, 0, 3000, 3000, 0, 3)
    assert m.acquire([over], T0 + 9000)[0].reset_ms == 0  # past the end: nothing to wait for
    assert m.quota_changed == {"k:q"}
    assert m.quota_rows(["k:q", "gone"]) == [("k:q", 4, T0 + 9000 + 40 * 86_400_000)]


def test_token_bucket_gets_back_only_what_time_has_not_refilled() -> None:
    """Reserved units given back late must not refill the bucket a second time."""
    m = MemoryCounters()
    c = dataclasses.replace(call("token_bucket", 100, 1000), extra=50)  # one unit per 10 ms
    r = m.acquire([c], T0)[0]
    assert (r.granted, r.stamp) == (99 // 16, T0 + 70)  # 1 + 6 units drawn: 70 ms ahead
    m.acquire([dataclasses.replace(c, extra=0)], T0 + 100)  # idle past the stamp, then 1 more
    m.refund([dataclasses.replace(c, cost=r.granted, extra=0)], [r.stamp], T0 + 100)
    peek = m.acquire([dataclasses.replace(c, cost=0, extra=0)], T0 + 100)[0]
    assert peek.remaining == 99  # time already gave those 6 back; a refund would make it 100
    # Still ahead of now: given back in full.
    r = m.acquire([c], T0 + 200)[0]
    m.refund([dataclasses.replace(c, cost=r.granted, extra=0)], [r.stamp], T0 + 200)
    assert m.acquire([dataclasses.replace(c, cost=0, extra=0)], T0 + 200)[0].remaining == 99


def test_renewing_many_leases_of_one_key_keeps_exactly_those() -> None:
    """A busy route's leases fall due together: renewed in one pass, still in order, and only
    the renewed ones outlive their first expiry."""
    m = MemoryCounters()
    lease = [call("concurrency", 5000, 1000, token=f"t{i}") for i in range(2000)]
    for i, c in enumerate(lease):
        assert m.acquire([c], T0 + i % 10)[0].allowed
    m.renew(lease[::2], T0 + 600)  # every other one, at 600 ms
    peek = dataclasses.replace(lease[0], cost=0, token="peek")
    assert m.acquire([peek], T0 + 1500)[0].remaining == 5000 - 1000
    assert m.acquire([peek], T0 + 1600)[0].remaining == 5000  # renewed to 1600 ms: gone now
