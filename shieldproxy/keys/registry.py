"""The key registry: cached lookups for the hot path, and the operations the admin API runs.

A request with a known key costs no storage call: views are cached per secret hash for
`cache_ttl_seconds`, and every instance drops its copy within a second of a change through
the store's invalidation channel (Redis pub/sub). Concurrent misses for one hash share one
load. When the store fails, a key seen within `max_stale_seconds` is still honoured; a key
never seen raises StoreUnavailable (the caller answers 503, never 401).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any

from shieldproxy.config import Config
from shieldproxy.keys.records import (
    KEY_HASHES,
    KEYS,
    TENANTS,
    KeyView,
    key_rules,
    plan_rules,
    public_key,
)
from shieldproxy.keys.secret import KeyHasher, display_parts, generate_key
from shieldproxy.store.base import Store, StoreError, StoreMisuse, StoreUnavailable

log = logging.getLogger(__name__)

CHANNEL = "invalidate"
LAST_USED = "key_last_used"
_NEGATIVE_TTL = 5.0
_MAX_ENTRIES = 100_000


class RegistryError(Exception):
    """Base of the admin operations' refusals; `status` is the HTTP answer."""

    status = 400
    code = "bad_request"


class NotFound(RegistryError):
    status = 404
    code = "not_found"


class Conflict(RegistryError):
    status = 409
    code = "conflict"


class Invalid(RegistryError):
    status = 422
    code = "invalid"


class _Entry:
    __slots__ = ("fresh_until", "stale_until", "view")

    def __init__(self, view: KeyView | None, fresh_until: float, stale_until: float) -> None:
        self.view = view
        self.fresh_until = fresh_until
        self.stale_until = stale_until

    def drop(self) -> None:
        """Taken out of the cache: whoever still holds it (KeyRegistry._vouched, a load under
        way) finds it neither fresh nor good to serve during an outage."""
        self.fresh_until = self.stale_until = -math.inf


_NOT_CACHED = _Entry(None, -math.inf, -math.inf)  # vouches for nothing


class KeyRegistry:
    def __init__(
        self,
        store: Store,
        hasher: KeyHasher,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.hasher = hasher
        self._config = config
        self._clock = clock
        self._wall = wall_clock
        self._ttl = config.auth.cache_ttl_seconds
        self._max_stale = config.auth.max_stale_seconds
        self._cache: dict[str, _Entry] = {}
        self._unknown: dict[str, float] = {}  # digest of a key that does not exist → until
        self._generation = 0  # bumped by every invalidation
        self._loading: dict[str, asyncio.Future[KeyView | None]] = {}  # loads under way
        # Key id -> wall-clock time of its last use, not yet written to the store. Written by
        # the hot path directly (checks.api_key: a method call per request cost more than the
        # write), in batches to the store by _flush_used; one dict for the registry's life.
        self.last_used: dict[str, float] = {}
        # Secrets of recently valid keys → the cache entry that vouched for them last, so a
        # repeat caller costs one lookup: no format check, no HMAC. An entry taken out of the
        # cache is dropped (_Entry.drop), so nothing stale is read through here. In memory
        # only (a request holds the secret anyway), bounded.
        self._vouched: dict[str, _Entry] = {}
        self._flusher: asyncio.Task[None] | None = None

    def reconfigure(self, config: Config) -> None:
        """A reload may change plans: cached views embed plan rules, so start afresh."""
        self._config = config
        self._ttl = config.auth.cache_ttl_seconds
        self._max_stale = config.auth.max_stale_seconds
        self._clear_cache()
        self._generation += 1
        self._loading.clear()  # loads under way build views with the old plans

    async def start(self) -> None:
        await self._store.subscribe(CHANNEL, self._on_invalidate)
        self._flusher = asyncio.create_task(self._flush_loop())

    async def close(self) -> None:
        # Loads belong to the registry, not to requests: none may outlive it and the store.
        loads = list(self._loading.values())
        for load in loads:
            load.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        with contextlib.suppress(StoreError):
            await self._flush_used()

    # ---- the hot path -------------------------------------------------------------------

    def cached_view(self, secret: str) -> KeyView | None:
        """A fresh cached view for a secret seen valid before, with no hashing; else None."""
        entry = self._vouched.get(secret)
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        return entry.view  # not None: fresh entries hold a view

    def knows(self, secret: str) -> bool:
        """This secret named an existing key when last looked up (its cache entry may be stale)."""
        return secret in self._vouched

    async def lookup(self, secret: str) -> KeyView | None:
        """The key a well-formed secret names, or None if no such key exists."""
        digest = self.hasher.hash(secret)
        view = await self._lookup_digest(digest)
        if view is not None:
            if len(self._vouched) >= _MAX_ENTRIES:
                self._vouched.pop(next(iter(self._vouched)))
            self._vouched[secret] = self._cache.get(digest, _NOT_CACHED)
        return view

    async def _lookup_digest(self, digest: str) -> KeyView | None:
        now = self._clock()
        entry = self._cache.get(digest)
        if entry is not None and now < entry.fresh_until:
            return entry.view
        unknown_until = self._unknown.get(digest)
        if unknown_until is not None and now < unknown_until:
            return None
        pending = self._loading.get(digest)
        if pending is None:
            # The registry's own task, not the first caller's: a client hanging up (its request
            # cancelled) must not fail the lookup for every request waiting on the same key.
            pending = asyncio.ensure_future(self._load_and_cache(digest, entry, now))
            self._loading[digest] = pending
            pending.add_done_callback(lambda task: self._loaded(digest, task))
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if pending.cancelled() and current is not None and not current.cancelling():
                # The load was stopped (the registry is closing), not this request.
                raise StoreUnavailable("the key registry is closing") from None
            raise

    def _loaded(self, digest: str, task: asyncio.Future[KeyView | None]) -> None:
        if self._loading.get(digest) is task:
            del self._loading[digest]
        if not task.cancelled():
            task.exception()  # every waiter has it through shield(); none may be left

    async def _load_and_cache(
        self, digest: str, entry: _Entry | None, now: float
    ) -> KeyView | None:
        generation = self._generation
        try:
            view = await self._load(digest)
        except StoreUnavailable:
            if entry is not None and entry.view is not None and now < entry.stale_until:
                return entry.view  # bounded staleness: honour what we knew
            raise
        except Exception as exc:
            if isinstance(exc, StoreError):
                raise
            # A record we cannot read is the store's fault, not the client's: 503, not 500.
            log.error("cannot read the key record for hash %s…: %r", digest[:8], exc)
            raise StoreMisuse(f"key record {digest[:8]}…: {exc!r}") from exc
        if generation != self._generation:
            # Something changed while we were reading: the view may predate it. Answer the
            # waiting requests with it, but do not cache it.
            return view
        if view is None:
            # Unknown keys live apart, so a flood of made-up keys cannot evict known ones.
            if len(self._unknown) >= _MAX_ENTRIES:
                self._unknown.pop(next(iter(self._unknown)))
            self._unknown[digest] = now + min(self._ttl, _NEGATIVE_TTL)
        else:
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.pop(next(iter(self._cache))).drop()
            if (old := self._cache.get(digest)) is not None:
                old.drop()
            self._cache[digest] = _Entry(view, now + self._ttl, now + self._max_stale)
        return view

    async def _load(self, digest: str) -> KeyView | None:
        ref = await self._store.get_record(KEY_HASHES, digest)
        if ref is None:
            return None
        doc = await self._store.get_record(KEYS, ref["key_id"])
        if doc is None:
            return None
        tenant_id = doc.get("tenant_id") or ""
        tenant = await self._store.get_record(TENANTS, tenant_id) if tenant_id else None
        return self._view(doc, ref.get("valid_until"), tenant)

    async def view_of(self, doc: dict[str, Any]) -> KeyView:
        """The hot-path view of a stored key (for usage reports)."""
        tenant_id = doc.get("tenant_id") or ""
        tenant = await self._store.get_record(TENANTS, tenant_id) if tenant_id else None
        return self._view(doc, None, tenant)

    def _view(
        self, doc: dict[str, Any], valid_until: float | None, tenant: dict[str, Any] | None
    ) -> KeyView:
        tenant_id = doc.get("tenant_id") or ""
        plan = self._config.plans.get(tenant["plan"]) if tenant else None
        scopes = frozenset(doc.get("scopes") or ())
        quota = doc.get("quota") or {}
        identity = (
            ("X-Shield-Key-Id", doc["id"]),
            ("X-Shield-Tenant-Id", tenant_id),
            ("X-Shield-Scopes", ",".join(sorted(scopes))),
        )
        return KeyView(
            id=doc["id"],
            tenant_id=tenant_id,
            scopes=scopes,
            identity_headers=identity,
            identity_lines="".join(f"{name}: {value}\r\n" for name, value in identity).encode(
                "latin-1", "replace"
            ),
            revoked=doc.get("status") == "revoked",
            expires_at=doc.get("expires_at"),
            secret_valid_until=valid_until,
            limits=tuple(
                key_rules(doc["id"], doc)
                + plan_rules(plan if tenant_id else None, self._config.store.on_store_error)
            ),
            quota=int(quota.get("monthly_requests") or 0),
            plan_quota=plan.monthly_quota if plan else 0,
            plan_overage=plan.overage if plan else "block",
            anchor_day=int(tenant.get("anchor_day", 1)) if tenant else 1,
        )

    def _on_invalidate(self, message: str) -> None:
        """`key:<id>`, `hash:<digest>` or `tenant:<id>` changed somewhere: forget it."""
        self._generation += 1  # loads already under way must not cache what they read...
        self._loading.clear()  # ...nor answer requests that arrive from now on
        kind, _, value = message.partition(":")
        if kind == "hash":
            if (entry := self._cache.pop(value, None)) is not None:
                entry.drop()
            self._unknown.pop(value, None)
        elif kind == "key":
            for digest in [d for d, e in self._cache.items() if e.view and e.view.id == value]:
                self._cache.pop(digest).drop()
        else:
            self._clear_cache()
            self._unknown.clear()

    def _clear_cache(self) -> None:
        for entry in self._cache.values():
            entry.drop()
        self._cache.clear()

    async def _changed(self, message: str) -> None:
        self._on_invalidate(message)
        try:
            await self._store.publish(CHANNEL, message)
        except StoreError as exc:
            # Other instances still re-read within cache_ttl_seconds.
            log.warning("could not publish a key change (%s): %s", message, exc)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            with contextlib.suppress(StoreError):
                await self._flush_used()

    async def _flush_used(self) -> None:
        used = list(self.last_used.items())
        self.last_used.clear()
        for i, (key_id, at) in enumerate(used):
            try:
                await self._store.put_record(LAST_USED, key_id, {"at": at})
            except BaseException:
                # Not written: kept for the next flush, unless a later use replaced it.
                for unwritten, when in used[i:]:
                    self.last_used.setdefault(unwritten, when)
                raise

    # ---- admin operations ---------------------------------------------------------------

    async def create_key(self, fields: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Store a new key; returns its public document and the secret (shown once)."""
        tenant_id = fields.get("tenant_id")
        if tenant_id and await self._store.get_record(TENANTS, tenant_id) is None:
            raise Invalid(f"tenant {tenant_id!r} does not exist")
        now = self._wall()
        secret = generate_key(self._config.auth.key_env)
        prefix, last4 = display_parts(secret)
        digest = self.hasher.hash(secret)
        doc = {
            "id": "key_" + secrets.token_hex(8),
            "name": fields["name"],
            "tenant_id": tenant_id,
            "prefix": prefix,
            "last4": last4,
            "scopes": fields.get("scopes", ["read"]),
            "rate_limits": fields.get("rate_limits", []),
            "quota": fields.get("quota"),
            "expires_at": fields.get("expires_at"),
            "metadata": fields.get("metadata", {}),
            "status": "active",
            "created_at": now,
            "updated_at": now,
            "last_used_at": None,
            "rotated_at": None,
            "previous_valid_until": None,
            "hash": digest,
            "previous_hash": None,
        }
        await self._store.put_record(KEYS, doc["id"], doc)
        await self._store.put_record(KEY_HASHES, digest, {"key_id": doc["id"], "valid_until": None})
        await self._changed(f"hash:{digest}")
        return await self._public(doc), secret

    async def list_keys(
        self, *, tenant_id: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        now = self._wall()
        docs = await self._store.list_records(KEYS)
        shown = [await self._public(doc, now) for doc in docs]
        return sorted(
            (
                d
                for d in shown
                if (tenant_id is None or d.get("tenant_id") == tenant_id)
                and (status is None or d["status"] == status)
            ),
            key=lambda d: (d["created_at"], d["id"]),
        )

    async def get_key(self, key_id: str) -> dict[str, Any]:
        return await self._public(await self._key_doc(key_id))

    async def get_key_doc(self, key_id: str) -> dict[str, Any]:
        """The stored document (hashes included) for usage and audit, never for clients."""
        return await self._key_doc(key_id)

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        doc = await self._key_doc(key_id)
        if doc.get("status") == "revoked":
            raise Conflict(f"key {key_id} is revoked")
        doc.update(changes)
        doc["updated_at"] = self._wall()
        await self._store.put_record(KEYS, key_id, doc)
        await self._changed(f"key:{key_id}")
        return await self._public(doc)

    async def rotate_key(self, key_id: str, grace_seconds: int) -> tuple[dict[str, Any], str]:
        """A new secret; the old one keeps working for `grace_seconds`, then stops."""
        doc = await self._key_doc(key_id)
        if doc.get("status") == "revoked":
            raise Conflict(f"key {key_id} is revoked")
        now = self._wall()
        secret = generate_key(self._config.auth.key_env)
        digest = self.hasher.hash(secret)
        old = doc["hash"]
        if doc.get("previous_hash"):
            await self._store.delete_record(KEY_HASHES, doc["previous_hash"])
        if grace_seconds > 0:
            until = now + grace_seconds
            await self._store.put_record(KEY_HASHES, old, {"key_id": key_id, "valid_until": until})
        else:
            until = None
            await self._store.delete_record(KEY_HASHES, old)
        await self._store.put_record(KEY_HASHES, digest, {"key_id": key_id, "valid_until": None})
        prefix, last4 = display_parts(secret)
        doc.update(
            hash=digest,
            previous_hash=old if grace_seconds > 0 else None,
            previous_valid_until=until,
            prefix=prefix,
            last4=last4,
            rotated_at=now,
            updated_at=now,
        )
        await self._store.put_record(KEYS, key_id, doc)
        await self._changed(f"key:{key_id}")
        await self._changed(f"hash:{digest}")
        return await self._public(doc), secret

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        doc = await self._key_doc(key_id)
        doc["status"] = "revoked"
        doc["updated_at"] = self._wall()
        await self._store.put_record(KEYS, key_id, doc)
        await self._changed(f"key:{key_id}")
        return await self._public(doc)

    async def _key_doc(self, key_id: str) -> dict[str, Any]:
        doc = await self._store.get_record(KEYS, key_id)
        if doc is None:
            raise NotFound(f"no key {key_id!r}")
        return doc

    async def _public(self, doc: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        shown = public_key(doc, self._wall() if now is None else now)
        used = self.last_used.get(doc["id"])
        if used is None:
            stored = await self._store.get_record(LAST_USED, doc["id"])
            used = stored["at"] if stored else None
        shown["last_used_at"] = used
        return shown

    # ---- tenants ------------------------------------------------------------------------

    async def create_tenant(self, fields: dict[str, Any]) -> dict[str, Any]:
        self._check_plan(fields["plan"])
        now = self._wall()
        doc = {
            "id": "ten_" + secrets.token_hex(8),
            "name": fields["name"],
            "plan": fields["plan"],
            "anchor_day": fields.get("anchor_day", 1),
            "metadata": fields.get("metadata", {}),
            "created_at": now,
            "updated_at": now,
        }
        await self._store.put_record(TENANTS, doc["id"], doc)
        return doc

    async def list_tenants(self) -> list[dict[str, Any]]:
        docs = await self._store.list_records(TENANTS)
        return sorted(docs, key=lambda d: (d["created_at"], d["id"]))

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        doc = await self._store.get_record(TENANTS, tenant_id)
        if doc is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        return doc

    async def update_tenant(self, tenant_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        doc = await self.get_tenant(tenant_id)
        if "plan" in changes:
            self._check_plan(changes["plan"])
        doc.update(changes)
        doc["updated_at"] = self._wall()
        await self._store.put_record(TENANTS, tenant_id, doc)
        await self._changed(f"tenant:{tenant_id}")
        return doc

    async def delete_tenant(self, tenant_id: str) -> dict[str, Any]:
        doc = await self.get_tenant(tenant_id)
        active = [k for k in await self.list_keys(tenant_id=tenant_id) if k["status"] == "active"]
        if active:
            raise Conflict(f"tenant {tenant_id} has {len(active)} active keys; revoke them first")
        await self._store.delete_record(TENANTS, tenant_id)
        await self._changed(f"tenant:{tenant_id}")
        return doc

    def _check_plan(self, plan: str) -> None:
        if plan not in self._config.plans:
            known = ", ".join(sorted(self._config.plans)) or "none are configured"
            raise Invalid(f"unknown plan {plan!r} (plans: {known})")
