"""Redis Cluster specifics: hash tags keep a limiter on one slot; cross-shard all-or-nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from shieldproxy.limits import Hit, LimitRule, RateLimiter
from shieldproxy.limits.keys import limit_key
from shieldproxy.store import open_store
from shieldproxy.store.redis import RedisStore
from tests.fixtures.redis_servers import RedisClusterServers

# Real servers: a hang must fail this test, never stall the suite.
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def cluster_limiter(
    redis_cluster: RedisClusterServers, tmp_path: Path
) -> AsyncIterator[tuple[RateLimiter, RedisStore]]:
    redis_cluster.flushall()
    store = open_store(redis_cluster.url, data_dir=tmp_path, timeout_seconds=2.0)
    assert isinstance(store, RedisStore)
    limiter = RateLimiter(store)
    yield limiter, store
    await limiter.close()
    await store.close()


def test_a_limiter_lives_on_one_slot() -> None:
    r = LimitRule("per-ip", "ip", "sliding_window", 10, 60)
    key = limit_key("sp:", r, "10.0.0.1")
    assert key_slot(key.encode()) == key_slot(b"per-ip|10.0.0.1")
    # different subjects spread over the slot space
    assert len({key_slot(limit_key("sp:", r, f"10.0.0.{i}").encode()) for i in range(50)}) > 40


async def test_cross_shard_deny_refunds_the_other_shards(
    cluster_limiter: tuple[RateLimiter, RedisStore], redis_cluster: RedisClusterServers
) -> None:
    limiter, store = cluster_limiter
    rules = [LimitRule(f"r{i}", "key", "fixed_window", 5, 3600) for i in range(6)]
    tight = LimitRule("tight", "key", "sliding_log", 1, 3600)
    hits = [Hit(r, "k") for r in rules]
    slots = {key_slot(limit_key("sp:", h.rule, "k").encode()) for h in hits}
    nodes = {redis_cluster_node(redis_cluster, s) for s in slots}
    assert len(nodes) >= 2, "test rules must span several shards"
    assert (await limiter.check([*hits, Hit(tight, "k")])).allowed
    trips = store.stats.round_trips
    v = await limiter.check([*hits, Hit(tight, "k")])
    assert not v.allowed and v.lease is None
    assert store.stats.round_trips - trips == 2  # one parallel acquire, one refund
    for _ in range(3):  # later denials come from the over-limit cache: no trips at all
        assert not (await limiter.check([*hits, Hit(tight, "k")])).allowed
    assert store.stats.round_trips - trips == 2
    v = await limiter.check(hits)
    assert v.allowed and [s.remaining for s in v.states] == [3] * 6


def redis_cluster_node(cluster: RedisClusterServers, slot: int) -> str:
    """Id of the master that owns `slot`, from CLUSTER NODES."""
    for row in cluster.nodes[0].cli("CLUSTER", "NODES").splitlines():
        fields = row.split()
        for part in fields[8:]:
            lo, _, hi = part.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return fields[0]
    raise AssertionError(f"no node owns slot {slot}")
