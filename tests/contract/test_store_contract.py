"""Store-level contract (records, events, heartbeats, raw calls) for every backend."""

from __future__ import annotations

import asyncio

import pytest

from shieldproxy.store import LimitCall, Store
from tests.contract.conftest import FakeClock

# Real servers: a hang must fail this test, never stall the suite.
pytestmark = pytest.mark.timeout(60)


async def test_records_roundtrip(store: Store) -> None:
    assert await store.get_record("key", "k1") is None
    await store.put_record("key", "k1", {"name": "one", "scopes": ["read"], "n": 1})
    await store.put_record("key", "k2", {"name": "two"})
    await store.put_record("tenant", "k1", {"name": "other kind"})
    assert await store.get_record("key", "k1") == {"name": "one", "scopes": ["read"], "n": 1}
    await store.put_record("key", "k1", {"name": "replaced"})
    assert await store.get_record("key", "k1") == {"name": "replaced"}
    names = sorted(d["name"] for d in await store.list_records("key"))
    assert names == ["replaced", "two"]
    assert await store.delete_record("key", "k1") is True
    assert await store.delete_record("key", "k1") is False
    assert [d["name"] for d in await store.list_records("key")] == ["two"]
    assert await store.list_records("nothing") == []


async def test_events_append_and_page(store: Store) -> None:
    ids = [await store.append_event("audit", {"i": i}) for i in range(5)]
    await store.append_event("other", {"i": 99})
    assert len(set(ids)) == 5
    every = await store.list_events("audit")
    assert [e.doc["i"] for e in every] == [0, 1, 2, 3, 4]
    assert [e.id for e in every] == ids
    page = await store.list_events("audit", since=ids[1], limit=2)
    assert [e.doc["i"] for e in page] == [2, 3]
    assert await store.list_events("audit", since=ids[-1]) == []


async def test_heartbeat_counts_live_instances(store: Store, clock: FakeClock) -> None:
    first = await store.heartbeat("a", 15)
    second = await store.heartbeat("b", 15)
    if store.shared:
        assert (first, second) == (1, 2)
        clock.advance(10)
        assert await store.heartbeat("a", 15) == 2
        clock.advance(6)  # b missed its beats
        assert await store.heartbeat("a", 15) == 1
        assert await store.heartbeat("a", 0) == 0  # leaving
    else:
        assert (first, second) == (1, 1)
    await store.ping()


async def test_concurrent_acquires_never_over_admit(store: Store) -> None:
    call = LimitCall(
        "sp:rl:{race|x}:fixed_window:60000", "fixed_window", 7, 60_000, 7, 1, False, "t"
    )
    results = await asyncio.gather(*(store.acquire([call]) for _ in range(40)))
    assert sum(r[0].allowed for r in results) == 7
    assert sorted(r[0].remaining for r in results if r[0].allowed) == list(range(7))
