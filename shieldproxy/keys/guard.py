"""Made-up API keys: a bounded number of store lookups per client address."""

from __future__ import annotations

import time
from collections.abc import Callable

_WINDOW_S = 60.0


class UnknownKeyGuard:
    """Each client IP may look up `per_minute` keys that turn out not to exist; then it waits.

    Why: a malformed key is refused in-process by its checksum, but anyone can compute a
    checksum, so a flood of well-formed made-up keys would cost one store lookup each (every
    one is new, so the registry's negative cache never hits). Counting only lookups that find
    nothing, per address, bounds that store work without touching clients whose keys exist.
    The count is per instance (it bounds this instance's lookups, which is the point) and kept
    as one GCRA time per address: `per_minute` misses at once, then one per 60/per_minute s.
    The caller passes an address per client network (an IPv6 client rotates addresses inside
    its /64). Clients behind one address (NAT) share its allowance; a secret that named a key
    before never waits (see KeyRegistry.knows), a key new to this instance may.
    """

    def __init__(
        self,
        per_minute: int,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = _WINDOW_S / per_minute
        self._span = _WINDOW_S - self._interval  # how far ahead of now a full allowance reaches
        self._max_entries = max_entries
        self._clock = clock
        self._tat: dict[str, float] = {}  # address → theoretical arrival time of its next miss

    def __len__(self) -> int:
        return len(self._tat)

    def retry_after(self, ip: str) -> float | None:
        """Seconds this address must wait before looking up another key, or None: go ahead."""
        tat = self._tat.get(ip)
        if tat is None:
            return None
        wait = tat - self._span - self._clock()
        return wait if wait > 1e-9 else None  # (sums of intervals drift by a few ulps)

    def charge(self, ip: str) -> None:
        """Count a lookup from this address before it is made (concurrent lookups are counted
        too); `forgive` it when the key turns out to exist."""
        now = self._clock()
        tat = self._tat.pop(ip, now)
        self._tat[ip] = max(tat, now) + self._interval  # re-inserted: newest last
        if len(self._tat) > self._max_entries:
            # The address seen longest ago goes; forgetting one costs at most one allowance.
            del self._tat[next(iter(self._tat))]

    def forgive(self, ip: str) -> None:
        """The counted lookup found a key (or never reached the store): it does not count."""
        tat = self._tat.get(ip)
        if tat is None:
            return
        tat -= self._interval
        if tat <= self._clock():
            del self._tat[ip]
        else:
            self._tat[ip] = tat
