"""Degraded-mode enforcement: each instance applies its share of a limit while the store is down."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from shieldproxy.limits.algorithms import MemoryCounters
from shieldproxy.limits.model import Hit
from shieldproxy.store.base import CallResult, LimitCall


def _enforced(hit: Hit) -> bool:
    return hit.rule.on_store_error == "local" and hit.rule.strategy != "quota"


class LocalFallback:
    """In-process twins at ceil(limit / live instances) for rules with on_store_error = "local".

    Dividing by the live-instance count (from heartbeats, last known value kept during an
    outage) keeps the fleet-wide total close to the configured limit while nobody can share
    counters; rounding up means a limit smaller than the fleet still admits something. Rules
    with "open" pass untouched: a storage fault must never turn into a 429 for them.

    Quotas always pass here (unless "closed", which the limiter handles before us): a monthly
    counter cannot be split per instance, and a paying customer must not get 429s because our
    store is down. Their units are not lost either: the limiter owes them to the store
    (QuotaBacklog) and charges them once it answers again.
    """

    def __init__(self, *, max_entries: int) -> None:
        self._counters = MemoryCounters(max_entries=max_entries)
        self.live_instances = 1

    def _scaled(self, hits: Sequence[Hit], calls: Sequence[LimitCall]) -> list[LimitCall]:
        live = max(1, self.live_instances)
        return [
            dataclasses.replace(c, limit=math.ceil(c.limit / live), burst=math.ceil(c.burst / live))
            if _enforced(h)
            else c
            for h, c in zip(hits, calls, strict=True)
        ]

    def acquire(
        self, hits: Sequence[Hit], calls: Sequence[LimitCall], now_ms: int, wall_ms: int
    ) -> tuple[list[LimitCall], list[CallResult]]:
        """Scaled calls (what was enforced) and their results; "open" hits always admit."""
        scaled = self._scaled(hits, calls)
        local = [c for h, c in zip(hits, scaled, strict=True) if _enforced(h)]
        answers = iter(self._counters.acquire(local, now_ms))
        results = [
            next(answers) if _enforced(h) else _passed(c, wall_ms)
            for h, c in zip(hits, scaled, strict=True)
        ]
        return scaled, results

    def charge(self, hits: Sequence[Hit], calls: Sequence[LimitCall], now_ms: int) -> None:
        scaled = self._scaled(hits, calls)
        self._counters.charge(
            [c for h, c in zip(hits, scaled, strict=True) if _enforced(h)], now_ms
        )

    def release(self, calls: Sequence[LimitCall]) -> None:
        self._counters.release(calls)

    def renew(self, calls: Sequence[LimitCall], now_ms: int) -> None:
        self._counters.renew(calls, now_ms)


def _passed(call: LimitCall, wall_ms: int) -> CallResult:
    if call.strategy == "quota":
        return CallResult(True, call.limit, max(0, call.period_end_ms - wall_ms), 0)
    return CallResult(True, call.limit, 0, 0)


class QuotaBacklog:
    """Quota units admitted while the store was down, owed to it until it answers again.

    Why not just let them go, like the rate-limit units a fallback admits: quota counters are
    billing data. Availability wins while the store is down (quota hits pass), but the usage
    must still reach the counters, or an outage would be free traffic and wrong invoices. Units
    are merged per counter, so the backlog grows with distinct counters (keys and tenants), not
    with requests; beyond `max_counters` new counters' units are dropped and counted.
    """

    def __init__(self, *, max_counters: int) -> None:
        self._owed: dict[str, LimitCall] = {}
        self._max = max_counters
        self.dropped_units = 0

    def __len__(self) -> int:
        return len(self._owed)

    def add(self, calls: Sequence[LimitCall]) -> None:
        for c in calls:
            if c.strategy != "quota" or c.cost <= 0:
                continue
            owed = self._owed.get(c.key)
            if owed is not None:
                self._owed[c.key] = dataclasses.replace(owed, cost=owed.cost + c.cost)
            elif len(self._owed) < self._max:
                self._owed[c.key] = c
            else:
                self.dropped_units += c.cost

    def take(self) -> list[LimitCall]:
        """Everything owed, removing it; give back what could not be charged with `add`."""
        owed, self._owed = list(self._owed.values()), {}
        return owed
