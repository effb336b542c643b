"""Single-process store: limiter counters in memory (Python twins), records in SQLite.

Quota counters are billing data and survive restarts: they are served from memory on the hot
path and written through to SQLite (table `counters`) on the SQLite worker thread, as absolute
values, one transaction per batch. A batch starts as soon as the previous one has committed, so
under load the batches grow instead of the writes queueing up. They are loaded back before the
first evaluation after a start.

What a crash can lose: `kill -9` of the process loses only the quota units counted after the
last committed batch began, i.e. those acknowledged while one write was in flight, typically a
few milliseconds and far below 100 ms (a committed WAL transaction survives a process crash with
synchronous=NORMAL). An OS crash or power loss can also lose the last transactions not yet synced
to disk. While SQLite is failing (disk full), writes are retried every second and the counters
stay correct in memory; a clean `close()` writes everything still pending.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from shieldproxy.limits.algorithms import MemoryCounters
from shieldproxy.store.base import CallResult, Event, LimitCall, Store, StoreError
from shieldproxy.store.pubsub import LocalBus
from shieldproxy.store.sqlite_records import SqliteRecords

log = logging.getLogger(__name__)

_RETRY_SECONDS = 1.0  # pause between attempts while SQLite refuses quota writes


class LocalStore(Store):
    """Counters live in this process only; correct for one worker, and the test twin of Redis."""

    shared = False

    def __init__(
        self,
        *,
        data_dir: Path,
        clock: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        prefix: str = "sp:",
        max_entries: int = 100_000,
    ) -> None:
        self.prefix = prefix
        self._clock = clock
        self._wall = wall_clock  # quota periods are calendar-based: wall-clock epoch time
        self._counters = MemoryCounters(max_entries=max_entries)
        self._records = SqliteRecords(data_dir / "shieldproxy.db")
        self._bus = LocalBus()
        self._loaded = False
        self._loading: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    async def publish(self, channel: str, message: str) -> None:
        await self._bus.publish(channel, message)

    async def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        await self._bus.subscribe(channel, callback)

    def _now_ms(self) -> int:
        return math.floor(self._clock() * 1000)

    def _wall_ms(self) -> int:
        return math.floor(self._wall() * 1000)

    # Counter calls are synchronous and tiny: once the saved quotas are loaded (the first call
    # only) there is no await point, hence they are atomic per request.
    async def acquire(self, calls: Sequence[LimitCall]) -> list[CallResult]:
        if not self._loaded:
            await self._load()
        results = self._counters.acquire(calls, self._now_ms(), self._wall_ms())
        self._persist()
        return results

    async def charge(self, calls: Sequence[LimitCall]) -> None:
        if not self._loaded:
            await self._load()
        self._counters.charge(calls, self._now_ms(), self._wall_ms())
        self._persist()

    async def refund(self, calls: Sequence[LimitCall], stamps: Sequence[int]) -> None:
        if not self._loaded:
            await self._load()
        self._counters.refund(calls, stamps, self._now_ms())
        self._persist()

    async def release(self, calls: Sequence[LimitCall]) -> None:
        self._counters.release(calls)

    async def renew(self, calls: Sequence[LimitCall]) -> None:
        self._counters.renew(calls, self._now_ms())

    async def _load(self) -> None:
        # One load shared by every caller that arrives before it finishes; a failed load
        # (StoreUnavailable) is retried by the next call.
        if self._loading is None or (self._loading.done() and not self._loaded):
            self._loading = asyncio.create_task(self._read_saved())
        await asyncio.shield(self._loading)

    async def _read_saved(self) -> None:
        rows = await self._records.load_counters(self._wall_ms())
        if not self._loaded:
            self._counters.load_quota(rows)
            self._loaded = True

    def _persist(self) -> None:
        if self._counters.quota_changed and (self._writer is None or self._writer.done()):
            self._writer = asyncio.create_task(self._write_quota())

    async def _write_quota(self) -> None:
        while self._counters.quota_changed:
            changed = sorted(self._counters.quota_changed)
            self._counters.quota_changed.clear()
            try:
                await self._records.save_counters(self._counters.quota_rows(changed))
            except asyncio.CancelledError:
                self._counters.quota_changed.update(changed)  # close() writes them
                raise
            except StoreError as exc:
                self._counters.quota_changed.update(changed)  # values are absolute: just redo
                log.warning("could not save quota counters (retrying): %s", exc)
                if self._closed:
                    raise
                await asyncio.sleep(_RETRY_SECONDS)

    def on_data_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        return None  # counters live and die with this process: never lost under it

    async def heartbeat(self, instance_id: str, ttl_seconds: float) -> int:
        return 1

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()  # it may be sleeping between retries; we write below
                await asyncio.gather(self._writer, return_exceptions=True)
            if self._counters.quota_changed:
                await self._write_quota()
        except StoreError as exc:
            log.error("quota counters not saved at shutdown: %s", exc)
        finally:
            await self._records.close()

    async def put_record(self, kind: str, record_id: str, doc: dict[str, Any]) -> None:
        await self._records.put(kind, record_id, doc)

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        return await self._records.get(kind, record_id)

    async def delete_record(self, kind: str, record_id: str) -> bool:
        return await self._records.delete(kind, record_id)

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        return await self._records.all(kind)

    async def append_event(self, kind: str, doc: dict[str, Any]) -> str:
        return await self._records.append(kind, doc)

    async def list_events(
        self, kind: str, *, since: str | None = None, limit: int = 100
    ) -> list[Event]:
        return await self._records.events(kind, since, limit)
