"""Local over-limit cache: denials the store already decided, answered without asking it again."""

from __future__ import annotations


class OverLimitCache:
    """key -> (deny until, smallest cost known to be denied), bounded.

    Why (envoy ratelimit's base_limiter does the same): a client flooding past its limit would
    otherwise cost one Redis script per request for answers we already know. Once the store says
    "this key denies cost c until T", every request for that key with cost >= c is denied locally
    until T. That is exact, not an approximation, for the window, log and bucket strategies: until
    T other traffic can only add usage, and a larger cost waits at least as long. Concurrency is
    never cached (a release can free a slot at any moment), nor are shadow rules (they never
    deny, and must keep counting in the store).
    """

    def __init__(self, *, max_entries: int = 100_000) -> None:
        self._entries: dict[str, tuple[float, int]] = {}
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def denied_until(self, key: str, cost: int, now: float) -> float | None:
        """The time until which this key denies `cost`, or None if we must ask the store."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        until, min_cost = entry
        if now >= until:
            del self._entries[key]
            return None
        return until if cost >= min_cost else None

    def put(self, key: str, until: float, cost: int) -> None:
        # The newest fact wins; re-inserting keeps the dict in insertion (age) order.
        self._entries.pop(key, None)
        self._entries[key] = (until, cost)
        if len(self._entries) > self._max:
            # Oldest insertion first: forgetting a denial only costs one more store call.
            del self._entries[next(iter(self._entries))]
