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
    Clients behind one address (NAT) share its allowance.
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
        return wait if wait > 0 else None

    def missed(self, ip: str) -> None:
        """A lookup from this address found no key: it counts against the address."""
        now = self._clock()
        tat = self._tat.pop(ip, now)
        self._tat[ip] = max(tat, now) + self._interval  # re-inserted: newest last
        if len(self._tat) > self._max_entries:
            # The address seen longest ago goes; forgetting one costs at most one allowance.
            del self._tat[next(iter(self._tat))]
