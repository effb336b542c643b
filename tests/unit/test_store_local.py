"""LocalStore: quota counters are durable (write-through to SQLite, loaded back on open)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from shieldproxy.limits import Hit, LimitRule, RateLimiter
from shieldproxy.limits.keys import limit_key
from shieldproxy.store.base import GRANT_SHARE
from shieldproxy.store.local import LocalStore

NOW = 1_700_000_040.0
DAY = 86_400.0


def quota(requests: int, end: float = NOW + DAY) -> LimitRule:
    return LimitRule("quota", "key", "quota", requests, 30 * DAY, period_end=end)


def local(data_dir: Path, now: float = NOW) -> tuple[LocalStore, RateLimiter]:
    store = LocalStore(data_dir=data_dir, clock=time.monotonic, wall_clock=lambda: now)
    return store, RateLimiter(store, wall_clock=lambda: now)


async def test_quota_counter_survives_close_and_reopen(tmp_path: Path) -> None:
    store, limiter = local(tmp_path)
    q = quota(5)
    for _ in range(3):
        assert (await limiter.check([Hit(q, "k@P")])).allowed
    await limiter.charge([Hit(q, "k@P")], 1)
    await limiter.close()
    await store.close()
    await store.close()  # safe twice

    store, limiter = local(tmp_path)
    v = await limiter.check([Hit(q, "k@P")])
    assert v.allowed and (v.states[0].used, v.states[0].remaining) == (5, 0)
    v = await limiter.check([Hit(q, "k@P")])
    assert not v.allowed and v.code == "quota_exceeded"
    await limiter.close()
    await store.close()


def _saved_count(path: Path, key: str) -> int | None:
    with sqlite3.connect(path / "shieldproxy.db") as db:
        row = db.execute("SELECT n FROM counters WHERE key = ?", (key,)).fetchone()
    return None if row is None else int(row[0])


async def test_quota_is_on_disk_before_close(tmp_path: Path) -> None:
    """What a kill -9 would find: the write-through lands without waiting for close(). Units
    reserved ahead and not spent yet are counted too (billing never loses a spent unit); close()
    gives them back."""
    store, limiter = local(tmp_path)
    q = quota(100)
    await asyncio.gather(*(limiter.check([Hit(q, "k@P")]) for _ in range(50)))
    key = limit_key("sp:", q, "k@P")
    deadline = time.monotonic() + 2
    while (n := _saved_count(tmp_path, key)) is None or n < 50:
        assert time.monotonic() < deadline, f"not written through: {n}"
        await asyncio.sleep(0.01)
    assert n <= 50 + 100 // GRANT_SHARE  # at most one grant held
    await limiter.close()
    await store.close()
    assert _saved_count(tmp_path, key) == 50


@pytest.mark.parametrize(("days_later", "kept"), [(39, True), (41, False)])
async def test_expired_counters_are_not_loaded(tmp_path: Path, days_later: int, kept: bool) -> None:
    store, limiter = local(tmp_path)
    q = quota(5, end=NOW + DAY)
    assert (await limiter.check([Hit(q, "k@P")])).allowed
    await limiter.close()
    await store.close()
    store, limiter = local(tmp_path, now=NOW + DAY + days_later * DAY)
    v = await limiter.peek([Hit(q, "k@P")])
    assert v.states[0].used == (1 if kept else 0)
    await limiter.close()
    await store.close()
