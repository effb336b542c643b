"""KeyRegistry cache races, on a real local store (SQLite) whose reads we can hold."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from shieldproxy.config import Config, PlanConfig
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.keys.secret import KeyHasher
from shieldproxy.store.base import StoreMisuse, StoreUnavailable
from shieldproxy.store.local import LocalStore


class HeldStore(LocalStore):
    """A LocalStore whose next key-record read waits until released (or fails)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir=data_dir, clock=lambda: 0.0)
        self.hold: asyncio.Event | None = None
        self.reached = asyncio.Event()
        self.fail: Exception | None = None

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        hold = self.hold
        if kind != "keys" or hold is None:
            return await super().get_record(kind, record_id)
        self.hold = None  # only the first read is held
        doc = await super().get_record(kind, record_id)  # read now, answered later
        self.reached.set()
        await hold.wait()
        if self.fail is not None:
            raise self.fail
        return doc


async def _registry(tmp_path: Path) -> tuple[HeldStore, KeyRegistry]:
    store = HeldStore(tmp_path)
    registry = KeyRegistry(store, KeyHasher(b"0123456789abcdef0123"), Config())
    await registry.start()
    return store, registry


async def test_a_revoke_during_a_load_is_not_cached_away(tmp_path: Path) -> None:
    store, registry = await _registry(tmp_path)
    doc, secret = await registry.create_key({"name": "k"})
    release = store.hold = asyncio.Event()
    loading = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()  # the load has read the key record (still active)...
    await registry.revoke_key(doc["id"])  # ...then the key is revoked and invalidated...
    release.set()  # ...and only then does the load finish with what it read
    await loading
    view = await registry.lookup(secret)
    assert view is not None and view.revoked, "a stale pre-revoke view was cached"
    await registry.close()
    await store.close()


async def test_waiters_get_an_answer_when_a_load_fails(tmp_path: Path) -> None:
    store, registry = await _registry(tmp_path)
    _, secret = await registry.create_key({"name": "k"})
    release = store.hold = asyncio.Event()
    store.fail = StoreMisuse("corrupt record")
    first = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()
    second = asyncio.create_task(registry.lookup(secret))  # joins the load under way
    await asyncio.sleep(0)
    release.set()
    for task in (first, second):
        with pytest.raises(StoreMisuse):
            await asyncio.wait_for(task, timeout=2)
    await registry.close()
    await store.close()


async def test_the_first_caller_hanging_up_does_not_fail_the_others(tmp_path: Path) -> None:
    """The load belongs to the registry: cancelling the request that started it (its client
    went away) leaves the lookup, and the cache, to the requests still waiting."""
    store, registry = await _registry(tmp_path)
    doc, secret = await registry.create_key({"name": "k"})
    release = store.hold = asyncio.Event()
    first = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()
    second = asyncio.create_task(registry.lookup(secret))  # joins the load under way
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    view = await asyncio.wait_for(second, timeout=2)
    assert view is not None and view.id == doc["id"]
    with pytest.raises(asyncio.CancelledError):
        await first
    reads = store.reached
    reads.clear()
    assert (await registry.lookup(secret)) == view and not reads.is_set()  # cached
    await registry.close()
    await store.close()


async def test_an_unreadable_record_is_a_store_fault(tmp_path: Path) -> None:
    store, registry = await _registry(tmp_path)
    _, secret = await registry.create_key({"name": "k"})
    release = store.hold = asyncio.Event()
    store.fail = KeyError("id")  # what a record missing a field would raise
    lookup = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()
    release.set()
    with pytest.raises(StoreMisuse, match="KeyError"):
        await asyncio.wait_for(lookup, timeout=2)
    await registry.close()
    await store.close()


async def test_closing_stops_loads_and_answers_their_waiters(tmp_path: Path) -> None:
    """No load outlives the registry (and the store closed after it); a request waiting on
    one gets a store fault (503), not a stray cancellation (which would count as a 499)."""
    store, registry = await _registry(tmp_path)
    _, secret = await registry.create_key({"name": "k"})
    store.hold = asyncio.Event()  # never released: only close() can end this load
    waiting = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()
    await registry.close()
    with pytest.raises(StoreUnavailable, match="closing"):
        await asyncio.wait_for(waiting, timeout=2)
    await store.close()


async def test_a_request_after_a_revoke_does_not_join_a_load_from_before_it(
    tmp_path: Path,
) -> None:
    store, registry = await _registry(tmp_path)
    doc, secret = await registry.create_key({"name": "k"})
    release = store.hold = asyncio.Event()
    before = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()  # the first load has read the key, still active
    await registry.revoke_key(doc["id"])
    after = await asyncio.wait_for(registry.lookup(secret), timeout=2)  # a load of its own
    assert after is not None and after.revoked
    release.set()
    first = await before
    assert first is not None and not first.revoked  # it asked before the revoke
    await registry.close()
    await store.close()


@pytest.mark.parametrize("change", ["revoke", "rotate", "tenant", "reconfigure", "ttl"])
async def test_a_cached_caller_sees_every_change_at_once(tmp_path: Path, change: str) -> None:
    """cached_view() answers a repeat caller from the entry that vouched for its secret last:
    whatever takes that entry out of the cache (an invalidation of the key, its hash or its
    tenant, a reload, its time running out) must stop it vouching there and then."""
    now = [0.0]
    store = HeldStore(tmp_path)
    config = Config(plans={"basic": PlanConfig()})
    registry = KeyRegistry(store, KeyHasher(b"0123456789abcdef0123"), config, clock=lambda: now[0])
    await registry.start()
    tenant = await registry.create_tenant({"name": "t", "plan": "basic"})
    doc, secret = await registry.create_key({"name": "k", "tenant_id": tenant["id"]})
    assert await registry.lookup(secret) is not None
    assert registry.cached_view(secret) is not None  # vouched for: no HMAC from now on
    if change == "revoke":
        await registry.revoke_key(doc["id"])
    elif change == "rotate":
        await registry.rotate_key(doc["id"], grace_seconds=0)
    elif change == "tenant":
        await registry.update_tenant(tenant["id"], {"name": "t2"})
    elif change == "reconfigure":
        registry.reconfigure(config)
    else:
        now[0] += config.auth.cache_ttl_seconds
    assert registry.cached_view(secret) is None
    assert registry.knows(secret)  # the unknown-key guard still does not count it
    view = await registry.lookup(secret)  # read again...
    if change == "rotate":
        assert view is None  # the old secret, with no grace, names no key any more
    else:
        assert view is not None and view.revoked == (change == "revoke")
        assert registry.cached_view(secret) is view  # ...and vouched for again
    await registry.close()
    await store.close()


async def test_a_key_revoked_during_an_outage_load_is_not_served_stale(tmp_path: Path) -> None:
    """A load that finds the store gone may answer with the last view it knew (bounded
    staleness), but not with one a revoke took out of the cache while it waited."""
    now = [0.0]
    store = HeldStore(tmp_path)
    registry = KeyRegistry(
        store, KeyHasher(b"0123456789abcdef0123"), Config(), clock=lambda: now[0]
    )
    await registry.start()
    doc, secret = await registry.create_key({"name": "k"})
    assert await registry.lookup(secret) is not None
    now[0] += Config().auth.cache_ttl_seconds  # stale, though within max_stale_seconds
    release = store.hold = asyncio.Event()
    store.fail = StoreUnavailable("store down")
    loading = asyncio.create_task(registry.lookup(secret))
    await store.reached.wait()
    await registry.revoke_key(doc["id"])  # invalidates the entry the load would fall back on
    release.set()
    with pytest.raises(StoreUnavailable):
        await asyncio.wait_for(loading, timeout=2)
    await registry.close()
    await store.close()


class FailingWrites(LocalStore):
    """A LocalStore whose record writes fail after `allowed` of them (an outage mid-flush)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir=data_dir, clock=lambda: 0.0)
        self.allowed = 10**9

    async def put_record(self, kind: str, record_id: str, doc: dict[str, Any]) -> None:
        if self.allowed <= 0:
            raise StoreUnavailable("down for the test")
        self.allowed -= 1
        await super().put_record(kind, record_id, doc)


async def test_last_use_times_a_failed_flush_did_not_write_are_kept(tmp_path: Path) -> None:
    """Uses are written in batches; a batch the store fails part-way through is not lost:
    what was not written is kept for the next flush, and a later use of a key wins."""
    store = FailingWrites(tmp_path)
    registry = KeyRegistry(store, KeyHasher(b"0123456789abcdef0123"), Config())
    registry.last_used.update({"key_a": 1.0, "key_b": 2.0, "key_c": 3.0})
    store.allowed = 1  # key_a is written, then the store fails
    with pytest.raises(StoreUnavailable):
        await registry._flush_used()
    registry.last_used["key_c"] = 4.0  # used again meanwhile
    assert registry.last_used == {"key_b": 2.0, "key_c": 4.0}
    store.allowed = 10**9
    await registry._flush_used()
    assert registry.last_used == {}
    written = {k: await store.get_record("key_last_used", k) for k in ("key_a", "key_b", "key_c")}
    assert written == {"key_a": {"at": 1.0}, "key_b": {"at": 2.0}, "key_c": {"at": 4.0}}
    await registry.close()
    await store.close()
