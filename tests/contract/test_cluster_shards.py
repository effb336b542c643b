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
from tests.fixtures.redis_servers import RedisClusterServers, RedisServer

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


def _node(cluster: RedisClusterServers, node_id: str) -> RedisServer:
    for node in cluster.nodes:
        if node.cli("CLUSTER", "MYID").strip() == node_id:
            return node
    raise AssertionError(f"no node {node_id}")


def _move_slot(cluster: RedisClusterServers, slot: int, key: str, target_id: str) -> None:
    """Reshard one slot the way redis-cli does: IMPORTING/MIGRATING, MIGRATE, then NODE."""
    source_id = redis_cluster_node(cluster, slot)
    source, target = _node(cluster, source_id), _node(cluster, target_id)
    assert target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", source_id) == "OK"
    assert source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", target_id) == "OK"
    if source.cli("EXISTS", key) == "1":
        reply = source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", key)
        assert reply == "OK", reply


def _finish_move(cluster: RedisClusterServers, slot: int, target_id: str) -> None:
    for node in cluster.nodes:
        assert node.cli("CLUSTER", "SETSLOT", str(slot), "NODE", target_id) == "OK"


async def test_limits_follow_a_slot_resharded_to_another_node(
    cluster_limiter: tuple[RateLimiter, RedisStore], redis_cluster: RedisClusterServers
) -> None:
    """Resharding under traffic: while the slot migrates the source answers ASK for the key it
    no longer holds, afterwards MOVED. Both must be followed (counts continue on the new node),
    never surface as a store error (which would put the limit on its fallback)."""
    limiter, _ = cluster_limiter
    rule = LimitRule("moving", "key", "fixed_window", 100, 3600)
    hits = [Hit(rule, "k")]
    key = limit_key("sp:", rule, "k")
    slot = key_slot(key.encode())
    for _ in range(3):
        assert (await limiter.check(hits)).allowed
    source_id = redis_cluster_node(redis_cluster, slot)
    target_id = next(
        i for i in (n.cli("CLUSTER", "MYID").strip() for n in redis_cluster.nodes) if i != source_id
    )
    try:
        _move_slot(redis_cluster, slot, key, target_id)  # the key is on the target: ASK
        v = await limiter.check(hits)
        assert v.allowed and not v.degraded and v.states[0].remaining == 96
        _finish_move(redis_cluster, slot, target_id)  # the slot is the target's: MOVED
        v = await limiter.check(hits)
        assert v.allowed and not v.degraded and v.states[0].remaining == 95
        assert _node(redis_cluster, target_id).cli("HGET", key, "n") == "5"
        assert limiter.stats.store_errors == 0
    finally:  # the cluster is shared by the module's tests: the slot goes home
        if redis_cluster_node(redis_cluster, slot) != source_id:
            _move_slot(redis_cluster, slot, key, source_id)
            _finish_move(redis_cluster, slot, source_id)
