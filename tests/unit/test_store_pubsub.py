"""Invalidation pub/sub against a real redis-server, including a hung (SIGSTOPped) one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shieldproxy.store import open_store
from shieldproxy.store.pubsub import RESYNC
from tests.fixtures.redis_servers import RedisServer


async def test_messages_reach_subscribers_and_a_hung_server_causes_a_resync(
    fault_redis: RedisServer, tmp_path: Path
) -> None:
    publisher = open_store(fault_redis.url, data_dir=tmp_path, timeout_seconds=1.0)
    listener = open_store(fault_redis.url, data_dir=tmp_path, timeout_seconds=1.0)
    seen: list[str] = []
    await listener.subscribe("invalidate", seen.append)
    await asyncio.sleep(0.2)  # the listener is subscribed
    await publisher.publish("invalidate", "key:key_1")
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.02)
    assert seen == ["key:key_1"]
    # A hung server never errors by itself: the PING watchdog must notice and resync.
    fault_redis.pause()
    await asyncio.sleep(8.0)
    fault_redis.resume()
    for _ in range(200):
        if RESYNC in seen:
            break
        await asyncio.sleep(0.05)
    assert RESYNC in seen, seen
    await publisher.publish("invalidate", "key:key_2")
    for _ in range(100):
        if "key:key_2" in seen:
            break
        await asyncio.sleep(0.05)
    assert "key:key_2" in seen
    await listener.close()
    await publisher.close()
