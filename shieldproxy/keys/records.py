"""Key and tenant records: the stored documents and the compact views the hot path reads."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from shieldproxy.config import PlanConfig
from shieldproxy.limits.model import LimitRule

KEYS = "keys"  # record kind: key id → key document (no secret)
KEY_HASHES = "key_hashes"  # record kind: HMAC of a secret → {"key_id", "valid_until"}
TENANTS = "tenants"  # record kind: tenant id → tenant document
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Status = Literal["active", "revoked", "expired"]


@dataclass(frozen=True, slots=True)
class KeyView:
    """What a request needs to know about its key, precomputed once per cache fill."""

    id: str
    tenant_id: str
    scopes: frozenset[str]
    # What the upstream is told about the caller: X-Shield-Key-Id, -Tenant-Id and -Scopes
    # ("read,write"), made once per view rather than once per request.
    identity_headers: tuple[tuple[str, str], ...]
    identity_lines: bytes  # the same as header lines, as the upstream request head carries them
    revoked: bool
    expires_at: float | None  # epoch seconds
    secret_valid_until: float | None  # a rotated-out secret stops working then
    # (rule, subject) without quota; subject None = resolved from the rule's scope per request
    limits: tuple[tuple[LimitRule, str | None], ...]
    quota: int  # the key's own monthly quota (0 = none)
    plan_quota: int  # the tenant plan's monthly quota (0 = none)
    plan_overage: str  # "block" | "allow"
    anchor_day: int
    # Derived (__post_init__), for the test every request makes in one comparison: before
    # this wall-clock instant the key is usable (-inf: revoked; else the earlier of its
    # expiry and its secret's end); and what a GET and a POST need, held or not.
    usable_until: float = field(init=False)
    reads: bool = field(init=False)
    writes: bool = field(init=False)
    has_quota: bool = field(init=False)  # a monthly quota of its own or its plan's

    def __post_init__(self) -> None:
        until = -math.inf if self.revoked else math.inf
        for end in (self.expires_at, self.secret_valid_until):
            if end is not None:
                until = min(until, end)
        object.__setattr__(self, "usable_until", until)
        object.__setattr__(self, "reads", self.allows(frozenset({"read"})))
        object.__setattr__(self, "writes", self.allows(frozenset({"write"})))
        object.__setattr__(self, "has_quota", bool(self.quota or self.plan_quota))

    def allows(self, needed: frozenset[str]) -> bool:
        """`admin` implies read and write: an admin key can do anything a key can."""
        return "admin" in self.scopes or needed <= self.scopes


def key_rules(key_id: str, doc: dict[str, Any]) -> list[tuple[LimitRule, str | None]]:
    """A key's own limits as rules counted per key id; named `key`, `key-2`, ..."""
    rules: list[tuple[LimitRule, str | None]] = []
    for index, limit in enumerate(doc.get("rate_limits") or []):
        name = "key" if index == 0 else f"key-{index + 1}"
        rule = LimitRule(
            name=name,
            scope="key",
            strategy=limit["strategy"],
            requests=int(limit["requests"]),
            window_seconds=float(limit["window_seconds"]),
            burst=limit.get("burst"),
        )
        rules.append((rule, key_id))
    return rules


def plan_rules(plan: PlanConfig | None, on_store_error: str) -> list[tuple[LimitRule, str | None]]:
    """A plan's limits; their subjects follow their scope (the tenant, the key, the IP...)."""
    if plan is None:
        return []
    return [(limit.to_rule(on_store_error), None) for limit in plan.limits]


def key_status(doc: dict[str, Any], now: float) -> Status:
    if doc.get("status") == "revoked":
        return "revoked"
    expires_at = doc.get("expires_at")
    if expires_at is not None and now >= expires_at:
        return "expired"
    return "active"


def billing_period(anchor_day: int, now: float) -> tuple[float, float]:
    """The billing month containing `now`: it starts on `anchor_day` (UTC), at midnight."""
    today = dt.datetime.fromtimestamp(now, dt.UTC)
    year, month = today.year, today.month
    if today.day < anchor_day:
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    start = dt.datetime(year, month, anchor_day, tzinfo=dt.UTC)
    next_year, next_month = (year, month + 1) if month < 12 else (year + 1, 1)
    end = dt.datetime(next_year, next_month, anchor_day, tzinfo=dt.UTC)
    return start.timestamp(), end.timestamp()


def public_key(doc: dict[str, Any], now: float) -> dict[str, Any]:
    """The document as the admin API shows it (status computed, internals dropped)."""
    shown = {k: v for k, v in doc.items() if k not in ("hash", "previous_hash")}
    shown["status"] = key_status(doc, now)
    return shown
