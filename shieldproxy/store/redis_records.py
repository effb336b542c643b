"""Durable records on Redis: one hash per record kind, one stream per event kind."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from shieldproxy.limits import keys
from shieldproxy.store.base import Event, StoreMisuse

T = TypeVar("T")


class RedisRecords:
    """Record and event methods of the Redis stores (standalone and cluster alike).

    A hash per kind keeps list_records one HVALS on one slot; records are admin-path data
    (thousands, not millions). Events go to a stream per kind, never trimmed here: audit and
    billable usage must not be dropped, so retention is the consumer's decision.
    """

    _client: Any
    _prefix: str

    async def _rec(self, op: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError  # RedisStore runs it under the breaker and records budget

    async def put_record(self, kind: str, record_id: str, doc: dict[str, Any]) -> None:
        key = keys.records_key(self._prefix, kind)
        await self._rec(lambda: self._client.hset(key, record_id, orjson.dumps(doc)))

    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        key = keys.records_key(self._prefix, kind)
        raw = await self._rec(lambda: self._client.hget(key, record_id))
        return None if raw is None else _load(raw)

    async def delete_record(self, kind: str, record_id: str) -> bool:
        key = keys.records_key(self._prefix, kind)
        return bool(await self._rec(lambda: self._client.hdel(key, record_id)))

    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        raws = await self._rec(lambda: self._client.hvals(keys.records_key(self._prefix, kind)))
        return [_load(r) for r in raws]

    async def append_event(self, kind: str, doc: dict[str, Any]) -> str:
        key = keys.events_key(self._prefix, kind)
        event_id = await self._rec(lambda: self._client.xadd(key, {"doc": orjson.dumps(doc)}))
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    async def list_events(
        self, kind: str, *, since: str | None = None, limit: int = 100
    ) -> list[Event]:
        key = keys.events_key(self._prefix, kind)
        low = f"({since}" if since else "-"
        rows = await self._rec(lambda: self._client.xrange(key, low, "+", count=limit))
        return [Event(i.decode(), _load(fields[b"doc"])) for i, fields in rows]


def _load(raw: bytes) -> dict[str, Any]:
    doc = orjson.loads(raw)
    if not isinstance(doc, dict):
        raise StoreMisuse("stored record is not a JSON object")
    return doc
