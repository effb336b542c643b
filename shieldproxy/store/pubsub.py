"""Change notifications between instances: Redis pub/sub, or in-process for the local store.

Used to drop cached key records everywhere within a second of an admin change. A listener
that loses its connection reconnects with backoff and then reports `*:resync`, because
messages published meanwhile are lost: subscribers must drop whatever they cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions as rex

log = logging.getLogger(__name__)

Callback = Callable[[str], None]
RESYNC = "*:resync"
_PING_EVERY = 2.0  # seconds of silence before we PING the subscribed connection
_SILENCE = 5.0  # seconds without any reply (message or PONG) before reconnecting


class LocalBus:
    """One process: publishing calls the subscribers directly."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Callback]] = {}

    async def publish(self, channel: str, message: str) -> None:
        for callback in self._subscribers.get(channel, ()):
            callback(message)

    async def subscribe(self, channel: str, callback: Callback) -> None:
        self._subscribers.setdefault(channel, []).append(callback)

    async def close(self) -> None:
        self._subscribers.clear()


class RedisBus:
    """Redis pub/sub on its own connection (a subscribed connection can do nothing else).

    In a Redis Cluster, PUBLISH reaches every node, so one node's connection is enough;
    `connect` is called again (possibly for another node) after a failure.
    """

    def __init__(self, connect: Callable[[], Any], prefix: str) -> None:
        self._connect = connect
        self._prefix = prefix
        self._subscribers: dict[str, list[Callback]] = {}
        self._task: asyncio.Task[None] | None = None
        self._publisher: Any = None

    def _name(self, channel: str) -> str:
        return f"{self._prefix}ch:{channel}"

    async def publish(self, channel: str, message: str) -> None:
        if self._publisher is None:
            self._publisher = self._connect()
        await self._publisher.publish(self._name(channel), message)

    async def subscribe(self, channel: str, callback: Callback) -> None:
        self._subscribers.setdefault(channel, []).append(callback)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = asyncio.create_task(self._listen())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._publisher is not None:
            with contextlib.suppress(rex.RedisError, OSError):
                await self._publisher.aclose()
            self._publisher = None

    def _deliver(self, channel: str, message: str) -> None:
        for callback in self._subscribers.get(channel, ()):
            try:
                callback(message)
            except Exception:  # a subscriber's bug must not kill the listener
                log.exception("invalidation subscriber failed on %r", message)

    async def _pump(self, pubsub: Any, names: dict[str, str]) -> None:
        """Deliver messages; PING when quiet. A half-open connection (a failover behind a
        virtual IP, a partition) never errors by itself: no answer to our PING within
        `_SILENCE` means reconnect, and the reconnect tells subscribers to resync."""
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while True:
            item = await pubsub.get_message(timeout=_PING_EVERY)
            now = loop.time()
            if item is not None:
                heard = now
                if item["type"] == "message":
                    name = item["channel"].decode()
                    if name in names:
                        self._deliver(names[name], item["data"].decode())
                continue
            if now - heard > _SILENCE:
                raise rex.ConnectionError("no answer to PING on the invalidation channel")
            await pubsub.ping()

    async def _listen(self) -> None:
        names = {self._name(channel): channel for channel in self._subscribers}
        delay = 0.2
        first = True
        while True:
            client = self._connect()
            try:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                async with asyncio.timeout(_SILENCE):
                    await pubsub.subscribe(*names)
                if not first:
                    for channel in self._subscribers:
                        self._deliver(channel, RESYNC)
                first, delay = False, 0.2
                await self._pump(pubsub, names)
            except (rex.RedisError, OSError, TimeoutError) as exc:
                log.debug("invalidation listener lost Redis (%r); reconnecting", exc)
            finally:
                with contextlib.suppress(rex.RedisError, OSError):
                    await client.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            first = False
