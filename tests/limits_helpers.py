"""Helpers for the limiter tests on a real Redis: a flushed server, its raw counters."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shieldproxy.limits import LimitRule
from shieldproxy.limits.keys import limit_key
from shieldproxy.store import Store, open_store
from tests.fixtures.redis_servers import RedisServer


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> AsyncIterator[str]:
    """The session's Redis, emptied for this test."""
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.flushall()
    await raw.aclose()
    yield redis_server.url


def open_roomy(url: str, tmp_path: Path) -> Store:
    # A generous budget: exact counts must not turn into timeouts on a loaded CI box.
    return open_store(url, data_dir=tmp_path, timeout_seconds=5.0)


async def stored_count(url: str, rule: LimitRule, subject: str) -> int:
    """The store's count for the current window (fixed: field n, sliding: field c)."""
    raw = aioredis.Redis.from_url(url)
    try:
        n = await raw.hget(
            limit_key("sp:", rule, subject), "c" if "sliding" in rule.strategy else "n"
        )
        return int(n or 0)
    finally:
        await raw.aclose()
