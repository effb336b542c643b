"""RateLimiter on a real Redis: over-limit cache, breaker, fallback policies, recovery, coalescing."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from shieldproxy.limits import Hit, LimiterSettings, LimitRule, RateLimiter
from shieldproxy.limits.fallback import QuotaBacklog
from shieldproxy.limits.keys import limit_key
from shieldproxy.store import LimitCall, Store, open_store
from shieldproxy.store.base import StoreTimeout
from shieldproxy.store.local import LocalStore
from shieldproxy.store.redis import RedisStore
from tests.fixtures.redis_servers import RedisServer

# Real servers: a hang must fail this test, never stall the suite.
pytestmark = pytest.mark.timeout(60)

BUDGET = 0.05
COOLDOWN = 0.3


@pytest.fixture(autouse=True)
def frozen_heap() -> Iterator[None]:
    """These tests time calls against a 50 ms budget. A full collection of what the suite has
    built up takes 40-70 ms here and would land in some budget; the server freezes its
    start-up objects for the same reason (server.py), so the tests do too."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture
async def store(fault_redis: RedisServer, tmp_path: Path) -> AsyncIterator[Store]:
    """A store with the production-like 50 ms budget, for the fault tests."""
    s = open_store(
        fault_redis.url, data_dir=tmp_path, timeout_seconds=BUDGET,
        breaker_cooldown_seconds=COOLDOWN,
    )  # fmt: skip
    yield s
    await s.close()


@pytest.fixture
async def roomy(fault_redis: RedisServer, tmp_path: Path) -> AsyncIterator[RedisStore]:
    """A generous budget: these tests assert exact counts, which a loaded CI box must not turn
    into timeouts and fallback answers."""
    s = open_store(fault_redis.url, data_dir=tmp_path, timeout_seconds=5.0)
    assert isinstance(s, RedisStore)
    yield s
    await s.close()


def rule(
    name: str, policy: str = "local", requests: int = 10, strategy: str = "token_bucket"
) -> LimitRule:
    return LimitRule(name, "ip", strategy, requests, 3600, on_store_error=policy)  # type: ignore[arg-type]


async def test_flood_past_the_limit_costs_no_redis_calls(
    roomy: RedisStore, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(roomy)
    r = rule("flood", requests=5)
    for _ in range(5):
        assert (await limiter.check([Hit(r, "attacker")])).allowed
    assert not (await limiter.check([Hit(r, "attacker")])).allowed  # the store says: until T
    before = fault_redis.commandstats().get("evalsha", 0)
    for _ in range(2000):
        v = await limiter.check([Hit(r, "attacker")])
        assert not v.allowed and v.retry_after is not None and v.retry_after >= 600
    assert fault_redis.commandstats().get("evalsha", 0) == before
    assert limiter.stats.cache_denied == 2000
    assert (await limiter.check([Hit(r, "someone-else")])).allowed  # others still go to Redis
    assert fault_redis.commandstats()["evalsha"] == before + 1


@pytest.mark.slow
async def test_dead_redis_fallback_policies_and_recovery(
    store: Store, fault_redis: RedisServer
) -> None:
    fast = LimiterSettings(heartbeat_interval_seconds=0.05)
    first, second = RateLimiter(store, settings=fast), RateLimiter(store, settings=fast)
    await first.start()
    await second.start()
    await asyncio.sleep(0.12)  # a heartbeat or two: each instance now sees both
    assert first.live_instances == 2
    local, opened, closed = rule("local", "local"), rule("open", "open"), rule("closed", "closed")
    assert (await first.check([Hit(local, "c")])).allowed
    fault_redis.kill9()

    # local: this instance enforces ceil(10 / 2) = 5 on its own
    got = [await first.check([Hit(local, "c")]) for _ in range(7)]
    assert all(v.degraded for v in got) and first.degraded
    assert [v.allowed for v in got] == [True] * 5 + [False] * 2
    assert got[-1].code == "rate_limited"
    # open: never a 429 because of the store
    v = await first.check([Hit(opened, "c")] * 1 + [Hit(local, "d")])
    assert v.allowed and v.degraded
    for _ in range(50):
        assert (await first.check([Hit(opened, "c")])).allowed
    # closed: refuse with store_unavailable
    v = await first.check([Hit(closed, "c"), Hit(opened, "c")])
    assert (v.allowed, v.code, v.retry_after, v.degraded) == (False, "store_unavailable", 1, True)

    fault_redis.restart_empty()  # back, with no data and no scripts
    await asyncio.sleep(COOLDOWN + 0.05)
    v = await first.check([Hit(local, "c")])
    assert v.allowed and not v.degraded and not first.degraded  # NOSCRIPT handled silently
    assert v.states[0].remaining == 9
    await first.close()
    await second.close()


@pytest.mark.slow
async def test_hung_redis_never_holds_a_request_past_the_budget(
    store: Store, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(store)
    r = rule("hung", "open")
    assert (await limiter.check([Hit(r, "x")])).allowed
    fault_redis.pause()
    try:
        durations = []
        for _ in range(40):
            t = time.monotonic()
            v = await limiter.check([Hit(r, "x")])
            durations.append(time.monotonic() - t)
            assert v.allowed and v.degraded
        assert max(durations) < BUDGET * 2
        # three failures open the breaker; after that nobody waits
        assert sum(d > BUDGET / 2 for d in durations) == 3
        await asyncio.sleep(COOLDOWN + 0.05)
        t = time.monotonic()
        assert (await limiter.check([Hit(r, "x")])).degraded  # the one probe, still hung
        assert time.monotonic() - t < BUDGET * 2
    finally:
        fault_redis.resume()
    await asyncio.sleep(COOLDOWN + 0.05)
    v = await limiter.check([Hit(r, "x")])
    assert v.allowed and not v.degraded


async def test_script_cache_flush_is_transparent(
    roomy: RedisStore, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(roomy)
    r = rule("noscript")
    assert not (await limiter.check([Hit(r, "x")])).degraded
    fault_redis.cli("SCRIPT", "FLUSH")
    v = await limiter.check([Hit(r, "x")])
    assert v.allowed and not v.degraded and v.states[0].remaining == 8


async def test_release_and_charge_never_raise_when_store_is_down(
    store: Store, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(store)
    conc = rule("conc", strategy="concurrency", requests=1)
    v = await limiter.check([Hit(conc, "x")])
    assert v.lease is not None
    fault_redis.kill9()
    await limiter.release(v.lease)
    await limiter.charge([Hit(rule("tb"), "x")], 5)
    assert limiter.stats.release_errors == 1 and limiter.stats.charge_errors == 1


async def test_close_sees_a_settle_through_after_its_caller_was_cancelled(
    roomy: RedisStore, fault_redis: RedisServer
) -> None:
    """At the end of the shutdown budget a request waiting for its settle is cancelled and the
    store is closed right after the limiter: the slot must still be freed, and the usage the
    upstream reported (charged after the release) must still reach the store."""
    limiter = RateLimiter(roomy, settings=LimiterSettings(reserve_seconds=0))
    slot = rule("slot", strategy="concurrency", requests=1)
    budget = rule("budget", strategy="fixed_window", requests=100)
    hits = [Hit(slot, "x"), Hit(budget, "x")]
    v = await limiter.check(hits)
    assert v.lease is not None
    waiting = asyncio.ensure_future(asyncio.shield(limiter.settle(v.lease, hits, 40)))
    await asyncio.sleep(0)
    waiting.cancel()  # the request's handler, cut by the shutdown budget
    await limiter.close()
    # Read before the loop runs again: by now the charge, which follows the release, must be
    # in Redis, not merely under way.
    assert fault_redis.cli("HGET", limit_key("sp:", budget, "x"), "n") == str(1 + 40)
    assert limiter.stats.charge_errors == 0 and limiter.stats.release_errors == 0


async def test_a_lease_renewal_that_fails_is_asked_again_after_recovery(
    store: Store, fault_redis: RedisServer
) -> None:
    t = [1000.0]
    limiter = RateLimiter(store, clock=lambda: t[0])
    conc = LimitRule("conc", "ip", "concurrency", 1, 10)
    v = await limiter.check([Hit(conc, "x")])
    assert v.lease is not None
    fault_redis.kill9()
    t[0] += 6  # past half the 10 s lease
    await limiter.renew_due()  # never raises
    assert (limiter.stats.renew_errors, limiter.stats.renewed) == (1, 0)
    fault_redis.restart_empty()
    await asyncio.sleep(COOLDOWN + 0.05)  # the breaker lets calls through again
    await limiter.renew_due()  # still due: asked again
    assert limiter.stats.renew_errors == 1 and limiter.stats.renewed >= 1
    # Redis came back empty: the renewal (and the restore its NOSCRIPT set off) put it back.
    assert fault_redis.cli("ZCARD", limit_key("sp:", conc, "x")) == "1"
    await limiter.release(v.lease)
    assert fault_redis.cli("ZCARD", limit_key("sp:", conc, "x")) == "0"
    await limiter.close()


async def _until_held(fault_redis: RedisServer, key: str, count: int) -> None:
    deadline = time.monotonic() + 5
    # In a thread: a blocking redis-cli must not stall the restore running under its budget.
    while await asyncio.to_thread(fault_redis.cli, "ZCARD", key) != str(count):
        assert time.monotonic() < deadline, f"{key} never held {count} leases"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("breaker", ["closed", "open"])
async def test_a_redis_restarted_empty_gets_the_leases_of_running_requests_back(
    store: Store, fault_redis: RedisServer, breaker: str
) -> None:
    """The first call to find Redis empty (NOSCRIPT) sets off putting the leases of requests in
    flight back, at once rather than at their next renewal. When the breaker was open, that
    call is its half-open probe, which must not turn the restore's own calls away."""
    limiter = RateLimiter(store)
    conc = rule("slots", strategy="concurrency", requests=2)
    other = rule("other", "open")
    key = limit_key("sp:", conc, "x")
    running = [await limiter.check([Hit(conc, "x")]) for _ in range(2)]
    assert all(v.allowed and v.lease is not None for v in running)
    if breaker == "open":
        fault_redis.kill9()
        while not store_is_open(store):
            assert (await limiter.check([Hit(other, "y")])).degraded
        fault_redis.start()  # back, empty
        await asyncio.sleep(COOLDOWN + 0.05)
    else:
        fault_redis.restart_empty()
    first = await limiter.check([Hit(other, "y")])  # finds Redis empty (the probe, if open)
    assert not first.degraded
    await _until_held(fault_redis, key, 2)
    assert limiter.stats.renew_errors == 0
    assert not (await limiter.check([Hit(conc, "x")])).allowed
    for v in running:
        assert v.lease is not None
        await limiter.release(v.lease)
    assert (await limiter.check([Hit(conc, "x")])).allowed
    await limiter.close()


def store_is_open(store: Store) -> bool:
    assert isinstance(store, RedisStore)
    return store._breaker.is_open


async def test_a_store_that_finds_out_again_during_a_restore_restores_once_more(
    roomy: RedisStore,
) -> None:
    """A second restart while the first restore is still busy must not be lost to the
    one-restore-at-a-time rule."""
    runs: list[int] = []

    async def restore() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            roomy._lost_data()  # found out again meanwhile (NOSCRIPT, or a heartbeat)
            roomy._lost_data()  # ...by several calls: one more run is enough
        await asyncio.sleep(0)

    roomy.on_data_lost(restore)
    roomy._lost_data()
    await asyncio.sleep(0.05)
    assert runs == [0, 1]


async def test_every_instance_learns_of_a_restart_from_its_heartbeat(
    roomy: RedisStore, fault_redis: RedisServer, tmp_path: Path
) -> None:
    """Only the first process to call a restarted Redis gets NOSCRIPT (it reloads the scripts
    for everyone); another instance finds out when its heartbeat finds it gone."""
    limiter = RateLimiter(roomy)
    await limiter.start()
    conc = rule("slots", strategy="concurrency", requests=1)
    running = await limiter.check([Hit(conc, "x")])
    assert running.lease is not None
    fault_redis.restart_empty()
    other = open_store(fault_redis.url, data_dir=tmp_path, timeout_seconds=5.0)
    neighbour = RateLimiter(other)
    try:
        await neighbour.start()  # loads both scripts
        taker = await neighbour.check([Hit(conc, "x")])  # the running request's slot, taken
        assert taker.allowed and taker.lease is not None
        assert fault_redis.cli("ZCARD", limit_key("sp:", conc, "x")) == "1"
        await limiter._beat()  # what the heartbeat loop does every few seconds
        await _until_held(fault_redis, limit_key("sp:", conc, "x"), 2)
        await neighbour.release(taker.lease)
        await limiter.release(running.lease)
        assert fault_redis.cli("ZCARD", limit_key("sp:", conc, "x")) == "0"
    finally:
        await neighbour.close()
        await other.close()
        await limiter.close()


class LateRenewals(LocalStore):
    """A store whose renewals arrive late: after the test's release, as a renewal sent on one
    connection can reach Redis after a release sent on another; `lost` drops the reply too."""

    def __init__(self, data_dir: Path, lost: bool) -> None:
        super().__init__(data_dir=data_dir, clock=lambda: 1000.0)
        self.released = asyncio.Event()
        self.lost = lost

    async def release(self, calls: Sequence[LimitCall]) -> None:
        await super().release(calls)
        self.released.set()

    async def renew(self, calls: Sequence[LimitCall]) -> None:
        await self.released.wait()
        await super().renew(calls)  # puts the released lease back
        if self.lost:
            raise StoreTimeout("no reply within the budget")


@pytest.mark.parametrize("lost", [False, True], ids=["answered", "reply_lost"])
async def test_a_renewal_that_crosses_a_release_does_not_keep_the_slot(
    tmp_path: Path, lost: bool
) -> None:
    store = LateRenewals(tmp_path, lost)
    t = [0.0]
    limiter = RateLimiter(store, clock=lambda: t[0])
    conc = LimitRule("one", "ip", "concurrency", 1, 10)
    v = await limiter.check([Hit(conc, "x")])
    assert v.lease is not None
    t[0] += 6  # past half the lease: due
    renewing = asyncio.create_task(limiter.renew_due())
    await asyncio.sleep(0)
    await limiter.release(v.lease)  # the request ends while its renewal is on its way
    await renewing
    await asyncio.sleep(0.01)  # the second release, in the background
    assert (await limiter.check([Hit(conc, "y")])).allowed  # another subject: unrelated
    assert (await limiter.check([Hit(conc, "x")])).allowed, "the ended request kept its slot"
    await limiter.close()
    await store.close()


async def test_concurrent_checks_share_one_round_trip(
    roomy: RedisStore, fault_redis: RedisServer
) -> None:
    assert isinstance(roomy, RedisStore)
    limiter = RateLimiter(roomy, settings=LimiterSettings(cache_max_entries=1))
    r = rule("coalesce", "closed", requests=100)
    r2 = rule("per-client", "closed", requests=1000, strategy="sliding_log")
    await limiter.check([Hit(r, "warm")])  # loads the script
    before = fault_redis.commandstats().get("evalsha", 0)
    trips = roomy.stats.round_trips
    verdicts = await asyncio.gather(
        *(limiter.check([Hit(r, "shared"), Hit(r2, f"c{i % 7}")]) for i in range(300))
    )
    assert sum(v.allowed for v in verdicts) == 100  # exact under coalescing
    assert roomy.stats.round_trips - trips <= 5
    assert fault_redis.commandstats()["evalsha"] - before <= 5


async def test_cancelled_callers_do_not_leak_concurrency_slots(
    roomy: RedisStore, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(roomy)
    conc = rule("slots", strategy="concurrency", requests=3)
    cancelled = 0
    for i in range(120):
        task = asyncio.create_task(limiter.check([Hit(conc, "x")]))
        # cancel before sending, while the script runs, as the reply lands, or after it
        for _ in range(i % 5):
            await asyncio.sleep(0)
        await asyncio.sleep([0, 0.0001, 0.0003, 0.001][i % 4])
        task.cancel()
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        if isinstance(result, asyncio.CancelledError):
            cancelled += 1
        else:
            assert not isinstance(result, BaseException)
            if result.lease is not None:
                await limiter.release(result.lease)
    assert cancelled > 20
    key = limit_key("sp:", conc, "x")
    deadline = time.monotonic() + 5
    await asyncio.sleep(0.05)  # let in-flight batches reach Redis
    while fault_redis.cli("ZCARD", key) != "0":  # orphan releases finish in the background
        assert time.monotonic() < deadline, "leases of cancelled callers were never released"
        await asyncio.sleep(0.01)
    got = [await limiter.check([Hit(conc, "x")]) for _ in range(3)]
    assert all(v.allowed for v in got)
    assert roomy.stats.orphan_releases > 0  # the cancelled-mid-flight path was exercised


async def test_quota_fails_open_and_owed_units_reach_the_store_after_recovery(
    store: Store, fault_redis: RedisServer
) -> None:
    limiter = RateLimiter(store)
    q = LimitRule("quota", "key", "quota", 3, 30 * 86_400, period_end=time.time() + 86_400)
    assert (await limiter.check([Hit(q, "k@P")])).allowed
    fault_redis.kill9()
    got = [await limiter.check([Hit(q, "k@P")]) for _ in range(5)]
    # a store outage never turns into quota_exceeded, even past the limit...
    assert all(v.allowed and v.degraded for v in got)
    await limiter.charge([Hit(q, "k@P")], 10)
    # ...but "closed" still closes, and a denied request owes nothing
    closed = dataclasses.replace(q, on_store_error="closed")
    assert (await limiter.check([Hit(closed, "k@P")])).code == "store_unavailable"
    assert (limiter.stats.quota_owed, limiter.stats.quota_recharged) == (15, 0)

    fault_redis.restart_empty()  # back (empty: this test server keeps nothing on disk)
    await asyncio.sleep(COOLDOWN + 0.05)
    v = await limiter.check([Hit(q, "k@P")])
    assert v.allowed and not v.degraded
    deadline = time.monotonic() + 5
    while limiter.stats.quota_recharged < 15:  # charged in the background
        assert time.monotonic() < deadline, "owed quota units never reached the store"
        await asyncio.sleep(0.01)
    v = await limiter.peek([Hit(q, "k@P")])
    assert v.states[0].used == 16 and limiter.stats.quota_dropped == 0
    await limiter.close()


def test_quota_backlog_merges_per_counter_and_counts_drops() -> None:
    backlog = QuotaBacklog(max_counters=2)
    calls = [LimitCall(f"q{i % 3}", "quota", 5, 1000, 5, 2, False, f"t{i}", 0) for i in range(6)]
    backlog.add([*calls, LimitCall("rl", "fixed_window", 5, 1000, 5, 1, False, "t", 0)])
    assert len(backlog) == 2 and backlog.dropped_units == 4  # q2 did not fit
    assert sorted((c.key, c.cost) for c in backlog.take()) == [("q0", 4), ("q1", 4)]
    assert len(backlog) == 0


async def test_a_password_changed_under_a_running_instance_is_logged_once(
    roomy: RedisStore, fault_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = RateLimiter(roomy)
    await limiter.start()
    assert not limiter.degraded
    fault_redis.cli("CONFIG", "SET", "requirepass", "rotated")
    fault_redis.cli("-a", "rotated", "CLIENT", "KILL", "TYPE", "normal")  # pooled ones log in again
    for _ in range(4):  # past breaker_failures: the breaker opens...
        await limiter._beat()
    await asyncio.sleep(1.1)  # ...and half-opens after its cooldown: refused again
    await limiter._beat()
    refusals = [r for r in caplog.records if "refuses this instance" in r.getMessage()]
    assert limiter.degraded and len(refusals) == 1
    assert refusals[0].levelname == "ERROR" and "AuthenticationError" in refusals[0].getMessage()
    fault_redis.cli("-a", "rotated", "CONFIG", "SET", "requirepass", "")
    await asyncio.sleep(1.1)  # the breaker's cooldown (1 s default) before calls go out again
    await limiter._beat()
    assert not limiter.degraded
    await limiter.close()


@pytest.mark.parametrize("strategy", ["fixed_window", "sliding_window", "token_bucket"])
async def test_units_reserved_for_a_cancelled_caller_go_back(
    roomy: RedisStore, strategy: str
) -> None:
    """A request whose client hung up while its store call was out: its own unit stays
    counted, the units reserved ahead with it are given back (no one holds them)."""
    key = f"sp:rl:{{orphan|{strategy}}}:{strategy}:60000"
    call = LimitCall(key, strategy, 1000, 60_000, 1000, 1, False, "t1", extra=100)  # type: ignore[arg-type]
    (result,) = await roomy.acquire([call])
    assert result.allowed and result.granted > 0
    await roomy._settle_orphans([([call], [result])])
    peek = dataclasses.replace(call, cost=0, extra=0, token="t2")
    (after,) = await roomy.acquire([peek])
    assert after.remaining == 999  # only the request's own unit is still counted
    assert roomy.stats.orphan_refunds == 1
