"""The only place that builds storage key strings (Redis keys and local counter keys)."""

from __future__ import annotations

from shieldproxy.limits.model import LimitRule

DEFAULT_PREFIX = "sp:"


def limit_key(prefix: str, rule: LimitRule, subject: str) -> str:
    """Key holding one limiter's state for one subject.

    The ``{rule|subject}`` hash tag pins everything one limiter touches to a single Redis Cluster
    slot, so its Lua script never raises CROSSSLOT, while different subjects spread over all
    shards. Strategy and window are part of the key (outside the tag) so that editing a rule's
    algorithm or window starts from fresh state instead of misreading an old layout (a hash read as
    a sorted set would be a WRONGTYPE error on the hot path).
    """
    if rule.strategy == "quota":
        return quota_key(prefix, rule, subject)
    return f"{prefix}rl:{{{rule.name}|{subject}}}:{rule.strategy}:{rule.window_ms}"


def quota_key(prefix: str, rule: LimitRule, subject: str) -> str:
    """Counter of one quota period: ``{prefix}q:{rule|subject}``.

    The subject already names the period (``"<key_id>@<period start>"``), so a new period is a
    new key. Unlike `limit_key` neither the window (the period length varies from month to month)
    nor the limit is part of the key: quota counters are billing data, and a plan upgraded
    mid-month must keep this month's count. The whole key is one ``{rule|subject}`` hash tag, so
    it shares the slot scheme of every other limiter key.
    """
    return f"{prefix}q:{{{rule.name}|{subject}}}"


def limit_key_parts(prefix: str, rule: LimitRule) -> tuple[str, str]:
    """`limit_key` split around the subject, so per-rule work is done once, not per request:
    `head + subject + tail == limit_key(prefix, rule, subject)`."""
    marker = "\x00"
    head, _, tail = limit_key(prefix, rule, marker).partition(marker)
    return head, tail


def instances_key(prefix: str) -> str:
    """Sorted set of live proxy instance ids scored by heartbeat expiry (ms)."""
    return f"{prefix}inst"


def records_key(prefix: str, kind: str) -> str:
    """Hash of durable records of one kind (id -> JSON); one tag per kind keeps HGETALL one slot."""
    return f"{prefix}rec:{{{kind}}}"


def events_key(prefix: str, kind: str) -> str:
    """Append-only stream of events of one kind."""
    return f"{prefix}ev:{{{kind}}}"
