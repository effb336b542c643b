"""A key's current usage: every limit's counter and this period's quota, read without cost."""

from __future__ import annotations

import time
from typing import Any

from shieldproxy.checks.api_key import quota_limits
from shieldproxy.keys.records import billing_period
from shieldproxy.limits.model import Hit
from shieldproxy.state import ProxyState


async def key_usage(state: ProxyState, key_id: str) -> dict[str, Any]:
    """Counters as the proxy sees them now (a zero-cost evaluation: nothing is consumed)."""
    registry = state.registry
    shown = await registry.get_key(key_id)  # raises NotFound
    view = await registry.view_of(await registry.get_key_doc(key_id))
    now = time.time()
    pairs = view.limits + quota_limits(view, now)
    # Limits counted per IP or route have no single value for a key: only key, tenant and
    # global counters are reported.
    by_scope = {"key": view.id, "tenant": view.tenant_id, "global": ""}
    hits = [
        Hit(rule, subject, 0)
        for rule, given in pairs
        if (subject := given if given is not None else by_scope.get(rule.scope)) is not None
    ]
    states = (await state.limiter.peek(hits)).states if hits else ()
    limits = []
    quota_limit = quota_used = None
    for hit, current in zip(hits, states, strict=True):
        if hit.rule.strategy == "quota":
            if hit.rule.scope == "key":
                quota_limit = current.limit
                quota_used = current.used  # overage included (remaining stops at 0)
            continue
        limits.append(
            {
                "name": current.name,
                "strategy": hit.rule.strategy,
                "limit": current.limit,
                "remaining": current.remaining,
                "reset_seconds": current.reset_seconds,
            }
        )
    start, end = billing_period(view.anchor_day, now)
    return {
        "key_id": key_id,
        "limits": limits,
        "quota_limit": quota_limit,
        "quota_used": quota_used,
        "quota_period_start": start if quota_limit is not None else None,
        "quota_period_end": end if quota_limit is not None else None,
        "last_used_at": shown["last_used_at"],
    }
