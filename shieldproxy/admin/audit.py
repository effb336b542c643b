"""The audit log: every admin change, who made it and from where, before and after."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from shieldproxy.store.base import Store

KIND = "audit"
_SECRET_FIELDS = frozenset({"key", "hash", "previous_hash", "token", "secret"})


def actor_id(token: str) -> str:
    """A stable name for an admin token that reveals nothing about it."""
    return "adm_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _scrub(doc: dict[str, Any] | None) -> dict[str, Any] | None:
    if doc is None:
        return None
    return {k: v for k, v in doc.items() if k not in _SECRET_FIELDS}


class AuditLog:
    """Appends to the store's durable `audit` event log (Redis stream / SQLite table)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def record(
        self,
        *,
        actor: str,
        ip: str,
        action: str,
        target: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        await self._store.append_event(
            KIND,
            {
                "at": time.time(),
                "actor": actor,
                "ip": ip,
                "action": action,
                "target": target,
                "before": _scrub(before),
                "after": _scrub(after),
            },
        )

    async def entries(
        self,
        *,
        since: str | None = None,
        limit: int = 100,
        action: str | None = None,
        target: str | None = None,
        actor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of entries in order, filtered; the cursor continues after the last one read."""
        found: list[dict[str, Any]] = []
        cursor = since
        while len(found) < limit:
            batch = await self._store.list_events(KIND, since=cursor, limit=500)
            if not batch:
                return found, None
            for event in batch:
                cursor = event.id
                doc = event.doc
                if (
                    (action is None or doc.get("action") == action)
                    and (target is None or doc.get("target") == target)
                    and (actor is None or doc.get("actor") == actor)
                ):
                    found.append({"id": event.id, **doc})
                    if len(found) == limit:
                        return found, cursor
        return found, cursor
