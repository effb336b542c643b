"""Durable records, events and quota counters for the local store, in SQLite (WAL) on one thread."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from shieldproxy.store.base import Event, StoreMisuse, StoreUnavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, id TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, doc BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_kind_seq ON events (kind, seq);
CREATE TABLE IF NOT EXISTS counters (
    key TEXT PRIMARY KEY, n INTEGER NOT NULL, expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
"""


class SqliteRecords:
    """Records table (kind, id) -> JSON and an append-only events table.

    Every statement runs on one dedicated thread that owns the connection: a WAL commit can wait
    on fsync for milliseconds, which must never stall the event loop that proxies requests, and a
    single thread serialises writers without SQLite's busy-retry loop. Records are admin-path data
    (keys are served from in-process caches), so the thread hop costs nothing that matters.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shieldproxy-sqlite")
        self._conn: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode keeps every committed transaction across a process crash; only
            # an OS crash or power loss can drop the last few, an acceptable trade for latency.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def job() -> T:
            try:
                return fn(self._connect())
            except sqlite3.OperationalError as exc:  # locked, disk full, unreadable file
                raise StoreUnavailable(f"sqlite: {exc}") from exc
            except sqlite3.Error as exc:
                raise StoreMisuse(f"sqlite: {exc}") from exc

        return await asyncio.get_running_loop().run_in_executor(self._executor, job)

    async def put(self, kind: str, record_id: str, doc: dict[str, Any]) -> None:
        blob = orjson.dumps(doc)
        await self._run(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO records (kind, id, doc) VALUES (?, ?, ?)",
                (kind, record_id, blob),
            )
        )

    async def get(self, kind: str, record_id: str) -> dict[str, Any] | None:
        row = await self._run(
            lambda c: c.execute(
                "SELECT doc FROM records WHERE kind = ? AND id = ?", (kind, record_id)
            ).fetchone()
        )
        return None if row is None else _load(row[0])

    async def delete(self, kind: str, record_id: str) -> bool:
        cur = await self._run(
            lambda c: c.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, record_id))
        )
        return cur.rowcount > 0

    async def all(self, kind: str) -> list[dict[str, Any]]:
        rows = await self._run(
            lambda c: c.execute("SELECT doc FROM records WHERE kind = ?", (kind,)).fetchall()
        )
        return [_load(r[0]) for r in rows]

    async def append(self, kind: str, doc: dict[str, Any]) -> str:
        blob = orjson.dumps(doc)
        cur = await self._run(
            lambda c: c.execute("INSERT INTO events (kind, doc) VALUES (?, ?)", (kind, blob))
        )
        return str(cur.lastrowid)

    async def events(self, kind: str, since: str | None, limit: int) -> list[Event]:
        after = int(since) if since else 0
        rows = await self._run(
            lambda c: c.execute(
                "SELECT seq, doc FROM events WHERE kind = ? AND seq > ? ORDER BY seq LIMIT ?",
                (kind, after, limit),
            ).fetchall()
        )
        return [Event(str(seq), _load(doc)) for seq, doc in rows]

    async def save_counters(self, rows: Sequence[tuple[str, int, int]]) -> None:
        """Write (key, count, expiry epoch ms) rows as one transaction (absolute values, so a
        retried batch never counts twice)."""
        rows = list(rows)

        def write(c: sqlite3.Connection) -> None:
            c.execute("BEGIN")
            try:
                c.executemany(
                    "INSERT OR REPLACE INTO counters (key, n, expires_ms) VALUES (?, ?, ?)", rows
                )
            except BaseException:
                c.execute("ROLLBACK")
                raise
            c.execute("COMMIT")

        await self._run(write)

    async def load_counters(self, now_ms: int) -> list[tuple[str, int, int]]:
        """Every live counter; those expired before `now_ms` are deleted on the way."""

        def read(c: sqlite3.Connection) -> list[tuple[str, int, int]]:
            c.execute("DELETE FROM counters WHERE expires_ms <= ?", (now_ms,))
            rows = c.execute("SELECT key, n, expires_ms FROM counters").fetchall()
            return [(str(k), int(n), int(e)) for k, n, e in rows]

        return await self._run(read)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=False)


def _load(blob: bytes) -> dict[str, Any]:
    doc = orjson.loads(blob)
    if not isinstance(doc, dict):
        raise StoreMisuse("stored record is not a JSON object")
    return doc
