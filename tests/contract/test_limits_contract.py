"""One limiter contract, run unchanged against the local, redis and redis_cluster stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from shieldproxy.limits import Hit, LimitRule, RateLimiter, Verdict
from shieldproxy.limits.keys import limit_key
from shieldproxy.limits.model import Strategy
from shieldproxy.store import Store
from shieldproxy.store.local import LocalStore
from tests.contract.conftest import EPOCH, FakeClock

# Real servers: a hang must fail this test, never stall the suite.
pytestmark = pytest.mark.timeout(60)


def rule(strategy: Strategy, requests: int, window: float, **kw: object) -> LimitRule:
    return LimitRule(
        name=kw.pop("name", strategy),
        scope="ip",
        strategy=strategy,  # type: ignore[arg-type]
        requests=requests,
        window_seconds=window,
        **kw,
    )  # type: ignore[arg-type]


async def go(limiter: RateLimiter, *hits: Hit) -> Verdict:
    verdict = await limiter.check(hits)
    assert not verdict.degraded, "answered by fallback: the store failed"
    return verdict


async def test_fixed_window_edges(limiter: RateLimiter, clock: FakeClock) -> None:
    r = rule("fixed_window", 3, 10)
    got = [await go(limiter, Hit(r, "1.2.3.4")) for _ in range(3)]
    assert [v.allowed for v in got] == [True] * 3
    assert [v.states[0].remaining for v in got] == [2, 1, 0]
    assert got[0].states[0].reset_seconds == 10
    clock.advance(9.999)
    v = await go(limiter, Hit(r, "1.2.3.4"))
    assert not v.allowed and v.code == "rate_limited"
    assert v.retry_after == 1 and v.states[0].remaining == 0
    assert abs(v.states[0].reset_seconds - 0.001) < 1e-9
    assert (await go(limiter, Hit(r, "5.6.7.8"))).allowed  # other subjects are independent
    clock.advance(0.001)  # the window edge: a fresh window
    v = await go(limiter, Hit(r, "1.2.3.4"))
    assert v.allowed and v.states[0].remaining == 2 and v.states[0].reset_seconds == 10


async def test_sliding_window_weights_previous_window(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    """The previous window's count weighs by the share of it still inside the sliding
    window, rounded up: a full window denies until a whole unit of it has faded, not from
    the instant it ends (rounded down, a 10-per-10 s limit once admitted an 11th request
    1 ms after the 10th)."""
    r = rule("sliding_window", 10, 10)
    for _ in range(10):
        assert (await go(limiter, Hit(r, "a"))).allowed
    assert not (await go(limiter, Hit(r, "a"))).allowed
    clock.advance(10)  # next window starts; the previous one still weighs 100%
    v = await go(limiter, Hit(r, "a"))
    assert not v.allowed and v.retry_after == 1
    clock.advance(0.001)  # weight 9999/10000: ceil(9.999) = 10, still full
    v = await go(limiter, Hit(r, "a"))
    assert not v.allowed and v.states[0].remaining == 0 and v.retry_after == 1
    clock.advance(0.998)  # 999 ms in: ceil(9.001) = 10, still full
    assert not (await go(limiter, Hit(r, "a"))).allowed
    clock.advance(0.002)  # 1.001 s in: ceil(8.999) = 9, one slot
    v = await go(limiter, Hit(r, "a"))
    assert v.allowed and v.states[0].remaining == 0
    clock.advance(4)  # 5.001 s in: ceil(4.999) + 1 = 6
    v = await go(limiter, Hit(r, "a"))
    assert v.allowed and v.states[0].remaining == 3


async def test_sliding_log_is_exact(limiter: RateLimiter, clock: FakeClock) -> None:
    r = rule("sliding_log", 3, 10)
    for step in (0, 4, 4):
        clock.advance(step)
        assert (await go(limiter, Hit(r, "a"))).allowed
    clock.advance(1)  # t=9: the first entry (t=0) expires at t=10
    v = await go(limiter, Hit(r, "a"))
    assert not v.allowed and v.retry_after == 1 and v.states[0].reset_seconds == 1
    clock.advance(1)
    v = await go(limiter, Hit(r, "a"))
    assert v.allowed and v.states[0].remaining == 0
    assert v.states[0].reset_seconds == 4  # the t=4 entry is now the oldest


async def test_token_bucket_burst_and_refill(limiter: RateLimiter, clock: FakeClock) -> None:
    r = rule("token_bucket", 1, 1, burst=3)
    got = [await go(limiter, Hit(r, "k")) for _ in range(3)]
    assert [v.states[0].remaining for v in got] == [2, 1, 0]
    assert got[0].states[0].limit == 3
    v = await go(limiter, Hit(r, "k"))
    assert not v.allowed and v.retry_after == 1
    assert abs(v.states[0].reset_seconds - 1) < 1e-9
    clock.advance(0.999)
    assert not (await go(limiter, Hit(r, "k"))).allowed
    clock.advance(0.001)
    v = await go(limiter, Hit(r, "k"))
    assert v.allowed and v.states[0].remaining == 0
    clock.advance(10)  # refills to the burst ceiling, not beyond
    v = await go(limiter, Hit(r, "k"))
    assert v.states[0].remaining == 2


async def test_concurrency_lease_release_and_expiry(limiter: RateLimiter, clock: FakeClock) -> None:
    r = rule("concurrency", 2, 30)
    a, b = await go(limiter, Hit(r, "t")), await go(limiter, Hit(r, "t"))
    assert a.allowed and b.allowed and a.lease is not None and b.lease is not None
    v = await go(limiter, Hit(r, "t"))
    assert not v.allowed and v.code == "concurrency_limited" and v.lease is None
    assert v.retry_after == 30
    await limiter.release(a.lease)
    await limiter.release(a.lease)  # idempotent
    c = await go(limiter, Hit(r, "t"))
    assert c.allowed and c.states[0].remaining == 0
    assert not (await go(limiter, Hit(r, "t"))).allowed
    clock.advance(30)  # leases of a crashed instance expire by themselves
    v = await go(limiter, Hit(r, "t"))
    assert v.allowed and v.states[0].remaining == 1


async def test_concurrency_leases_are_renewed_while_their_requests_run(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    r = rule("concurrency", 1, 10)
    a = await go(limiter, Hit(r, "t"))
    assert a.allowed and a.lease is not None
    clock.advance(4)
    await limiter.renew_due()
    assert limiter.stats.renewed == 0  # not half a lease old yet
    clock.advance(2)
    await limiter.renew_due()
    assert limiter.stats.renewed == 1  # at 6 s: now held until 16 s
    clock.advance(8)  # 14 s: past the lease as granted
    v = await go(limiter, Hit(r, "t"))
    assert not v.allowed and v.code == "concurrency_limited"
    await limiter.release(a.lease)
    assert (await go(limiter, Hit(r, "t"))).allowed


async def test_a_lease_that_is_gone_is_put_back_by_renewing(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    """A lease that expired while its request still ran (say, its instance stalled) may have had
    its slot taken meanwhile. Both requests run, so renewing puts it back and the count says so:
    nobody else gets in until one of them ends."""
    r = rule("concurrency", 1, 10)
    late = await go(limiter, Hit(r, "t"))
    clock.advance(11)
    taker = await go(limiter, Hit(r, "t"))  # the expired lease's slot, taken
    assert late.allowed and late.lease is not None
    assert taker.allowed and taker.lease is not None
    await limiter.renew_due()  # the late lease is due, and gone from the store
    assert not (await go(limiter, Hit(r, "t"))).allowed, "two requests run on one slot"
    await limiter.release(taker.lease)
    assert not (await go(limiter, Hit(r, "t"))).allowed, "the late request still runs"
    await limiter.release(late.lease)
    assert (await go(limiter, Hit(r, "t"))).allowed


async def test_denied_request_consumes_nothing(limiter: RateLimiter) -> None:
    wide = rule("fixed_window", 5, 60, name="wide")
    narrow = rule("sliding_window", 1, 60, name="narrow")
    log = rule("sliding_log", 5, 60, name="log")
    bucket = rule("token_bucket", 5, 60, name="bucket")
    conc = rule("concurrency", 5, 60, name="conc")
    others = [Hit(wide, "u"), Hit(log, "u"), Hit(bucket, "u"), Hit(conc, "u")]
    assert (await go(limiter, *others, Hit(narrow, "u"))).allowed
    for _ in range(3):
        v = await go(limiter, *others, Hit(narrow, "u"))
        assert not v.allowed and v.lease is None
        assert [s.allowed for s in v.states] == [True, True, True, True, False]
    v = await go(limiter, *others)
    assert v.allowed
    assert [s.remaining for s in v.states] == [3, 3, 3, 3]


async def test_cost_and_check_only(limiter: RateLimiter) -> None:
    for strategy in ("fixed_window", "sliding_window", "sliding_log", "token_bucket"):
        r = rule(strategy, 5, 60)  # type: ignore[arg-type]
        v = await go(limiter, Hit(r, "c", cost=3))
        assert v.allowed and v.states[0].remaining == 2, strategy
        v = await go(limiter, Hit(r, "c", cost=3))
        assert not v.allowed and v.states[0].remaining == 2, strategy
        v = await go(limiter, Hit(r, "c", cost=0))
        assert v.allowed and v.states[0].remaining == 2, strategy
        v = await limiter.peek([Hit(r, "c")])
        assert v.allowed and v.states[0].remaining == 2 and v.lease is None, strategy
        v = await go(limiter, Hit(r, "c", cost=2))
        assert v.allowed and v.states[0].remaining == 0, strategy
        v = await go(limiter, Hit(r, "c", cost=9))  # more than the limit: never admits
        assert not v.allowed and v.retry_after is not None, strategy


async def test_shadow_counts_but_never_denies(limiter: RateLimiter) -> None:
    shadow = rule("fixed_window", 1, 60, name="shadow", shadow=True)
    real = rule("fixed_window", 10, 60, name="real")
    first = await go(limiter, Hit(shadow, "s"), Hit(real, "s"))
    assert first.allowed and not first.states[0].shadow_denied
    second = await go(limiter, Hit(shadow, "s"), Hit(real, "s"))
    assert second.allowed and second.code == ""
    assert second.states[0].shadow_denied and not second.states[0].allowed
    assert second.states[1].remaining == 8  # the real rule was consumed both times
    assert limiter.stats.shadow_denied == 1


async def test_charge_debits_after_the_fact(limiter: RateLimiter) -> None:
    for strategy in ("fixed_window", "sliding_window", "sliding_log", "token_bucket"):
        r = rule(strategy, 10, 60)  # type: ignore[arg-type]
        assert (await go(limiter, Hit(r, "ai"))).states[0].remaining == 9
        await limiter.charge([Hit(r, "ai")], 8)
        v = await go(limiter, Hit(r, "ai"))
        assert v.allowed and v.states[0].remaining == 0, strategy
        await limiter.charge([Hit(r, "ai")], 50)  # debt beyond the limit is allowed
        assert not (await go(limiter, Hit(r, "ai"))).allowed, strategy


async def test_over_limit_cache_answers_until_reset(limiter: RateLimiter, clock: FakeClock) -> None:
    r = rule("fixed_window", 1, 10)
    assert (await go(limiter, Hit(r, "x"))).allowed
    assert not (await go(limiter, Hit(r, "x"))).allowed
    before = limiter.stats.cache_denied
    for _ in range(5):
        v = await go(limiter, Hit(r, "x"))
        assert not v.allowed and v.retry_after == 10
    assert limiter.stats.cache_denied == before + 5
    clock.advance(10)
    assert (await go(limiter, Hit(r, "x"))).allowed


# ---- quota ----------------------------------------------------------------------------------

DAY = 86_400.0
KEEP_MS = 40 * 86_400_000  # quota counters outlive their period by 40 days


def quota(
    requests: int, *, name: str = "quota", end: float = EPOCH + DAY, **kw: object
) -> LimitRule:
    return LimitRule(name, "key", "quota", requests, 30 * DAY, period_end=end, **kw)  # type: ignore[arg-type]


async def test_quota_admits_to_the_limit_then_denies(
    limiter: RateLimiter, clock: FakeClock
) -> None:
    q = quota(3)
    got = [await go(limiter, Hit(q, "k1@P1")) for _ in range(3)]
    assert all(v.allowed for v in got)
    assert [(v.states[0].remaining, v.states[0].used) for v in got] == [(2, 1), (1, 2), (0, 3)]
    assert got[0].states[0].reset_seconds == DAY and got[0].states[0].limit == 3
    clock.advance(100)
    v = await go(limiter, Hit(q, "k1@P1"))
    assert not v.allowed and v.code == "quota_exceeded" and v.retry_after == DAY - 100
    assert (v.states[0].remaining, v.states[0].used) == (0, 3)
    v = await go(limiter, Hit(q, "k1@P1"))  # from the over-limit cache: same answer
    assert not v.allowed and v.code == "quota_exceeded"
    peek = await limiter.peek([Hit(q, "k1@P1")])
    assert (peek.states[0].remaining, peek.states[0].used) == (0, 3)
    assert (await go(limiter, Hit(q, "k2@P1", cost=3))).allowed  # other keys are independent
    bigger = quota(5)  # a plan upgraded mid-period keeps the count and admits at once
    v = await go(limiter, Hit(bigger, "k1@P1"))
    assert v.allowed and (v.states[0].remaining, v.states[0].used) == (1, 4)


async def test_quota_is_all_or_nothing_with_other_limits(limiter: RateLimiter) -> None:
    q = quota(2)
    tight = rule("fixed_window", 1, 60, name="tight")
    other = rule("sliding_window", 5, 60, name="other")
    assert (await go(limiter, Hit(q, "k@P"), Hit(tight, "k"))).allowed
    v = await go(limiter, Hit(q, "k@P"), Hit(tight, "k"))
    assert not v.allowed and v.code == "rate_limited"  # the quota unit was not consumed
    assert (await limiter.peek([Hit(q, "k@P")])).states[0].used == 1
    assert (await go(limiter, Hit(q, "k@P"), Hit(other, "k"))).allowed
    v = await go(limiter, Hit(q, "k@P"), Hit(other, "k"))
    assert not v.allowed and v.code == "quota_exceeded"
    assert [s.allowed for s in v.states] == [False, True]
    v = await go(limiter, Hit(other, "k"))
    assert v.allowed and v.states[0].remaining == 3  # the quota denial consumed nothing
    # both deny: the longest wait (the quota's period end) names the reason
    v = await go(limiter, Hit(tight, "k"), Hit(q, "k@P"))
    assert not v.allowed and v.code == "quota_exceeded" and v.retry_after == DAY


async def test_quota_overage_is_counted_past_the_limit(limiter: RateLimiter) -> None:
    plan = quota(2, name="plan-quota", shadow=True)  # overage = "allow"
    got = [await go(limiter, Hit(plan, "t@P")) for _ in range(4)]
    assert all(v.allowed and v.code == "" for v in got)
    assert [s.states[0].shadow_denied for s in got] == [False, False, True, True]
    assert [s.states[0].used for s in got] == [1, 2, 3, 4]
    assert [s.states[0].remaining for s in got] == [1, 0, 0, 0]
    # a request denied by another limit is not billed, overage or not
    tight = rule("fixed_window", 1, 60, name="tight")
    assert (await go(limiter, Hit(plan, "t@P"), Hit(tight, "t"))).allowed
    assert not (await go(limiter, Hit(plan, "t@P"), Hit(tight, "t"))).allowed
    assert (await limiter.peek([Hit(plan, "t@P")])).states[0].used == 5
    await limiter.charge([Hit(plan, "t@P")], 10)  # post-response debit, e.g. tokens
    assert (await limiter.peek([Hit(plan, "t@P")])).states[0].used == 15


async def test_quota_charge_debits_the_counter(limiter: RateLimiter) -> None:
    q = quota(10)
    assert (await go(limiter, Hit(q, "k@P"))).states[0].used == 1
    await limiter.charge([Hit(q, "k@P")], 8)
    v = await go(limiter, Hit(q, "k@P"))
    assert v.allowed and (v.states[0].remaining, v.states[0].used) == (0, 10)
    v = await go(limiter, Hit(q, "k@P"))
    assert not v.allowed and v.code == "quota_exceeded"


async def test_quota_new_period_is_a_fresh_counter(limiter: RateLimiter, clock: FakeClock) -> None:
    # The caller names the period in the subject ("<id>@<period start>").
    march = quota(1, end=EPOCH + 10)
    assert (await go(limiter, Hit(march, f"k@{EPOCH:.0f}"))).allowed
    v = await go(limiter, Hit(march, f"k@{EPOCH:.0f}"))
    assert not v.allowed and v.code == "quota_exceeded" and v.retry_after == 10
    clock.advance(10)
    april = quota(1, end=EPOCH + 20)
    v = await go(limiter, Hit(april, f"k@{EPOCH + 10:.0f}"))
    assert v.allowed and v.states[0].used == 1 and v.states[0].reset_seconds == 10


async def test_quota_counter_is_kept_40_days_past_the_period(
    limiter: RateLimiter, store: Store, clock: FakeClock, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:  # fmt: skip
    q = quota(5, end=EPOCH + 3 * DAY)
    assert (await go(limiter, Hit(q, "k@P"))).allowed
    key = limit_key(store.prefix, q, "k@P")
    assert key == "sp:q:{quota|k@P}"  # no window in a quota key: periods vary in length
    expected_ms = 3 * DAY * 1000 + KEEP_MS  # from the (fake) now
    if isinstance(store, LocalStore):
        await store.close()  # flushes the write-through; then read what SQLite holds
        with sqlite3.connect(tmp_path / "shieldproxy.db") as db:
            row = db.execute("SELECT n, expires_ms FROM counters WHERE key = ?", (key,)).fetchone()
        assert row == (1, round(EPOCH * 1000 + expected_ms))
        return
    servers = (
        request.getfixturevalue("redis_cluster").nodes
        if "cluster" in type(store).__name__.lower()
        else [request.getfixturevalue("redis_server")]
    )
    ttls = [int(t) for s in servers if (t := s.cli("PTTL", key)).lstrip("-").isdigit()]
    assert any(abs(t - expected_ms) < 5_000 for t in ttls), ttls
