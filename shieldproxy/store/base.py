"""The storage contract every backend implements: atomic limit batches, leases, heartbeats, records.

Exceptions raised by stores (denials are values, never exceptions)::

    StoreError                  anything a store raises on purpose
    ├── StoreUnavailable        a fault: the answer is unknown, the caller applies its fallback
    │   ├── StoreTimeout        no reply within the per-call budget (hung or overloaded server)
    │   ├── StoreConnectionError  refused, reset, DNS, cluster topology down, server loading
    │   └── CircuitOpen         recent calls failed; we did not even try (costs no timeout)
    └── StoreMisuse             a bug or bad setup: wrong argument, script error, WRONGTYPE

Library exceptions (redis-py, sqlite3) are translated into this tree inside the module that owns
the library and never escape it.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

StrategyName = Literal[
    "fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency", "quota"
]


class StoreError(Exception):
    """Base of everything a store raises."""


class StoreUnavailable(StoreError):
    """The store could not answer; the outcome of the call is unknown."""


class StoreTimeout(StoreUnavailable):
    """No reply within the per-call budget."""


class StoreConnectionError(StoreUnavailable):
    """The connection failed (refused, reset, cluster down, server loading)."""


class StoreRefused(StoreConnectionError):
    """The store turned down our credentials or certificate: a setup error, not an outage.

    Still a StoreUnavailable, so that requests are answered by `on_store_error` as in an outage
    (never a 401/403 caused by the store); server startup stops on it instead (see serve).
    """


class CircuitOpen(StoreUnavailable):
    """The circuit breaker is open: the call was not attempted."""


class StoreMisuse(StoreError):
    """A programming or setup error (bad arguments, script error, wrong key type)."""


# Built several times per request: not frozen, because a frozen dataclass pays
# object.__setattr__ per field (~0.9 µs more per instance). Treat it as immutable.
@dataclass(slots=True)
class LimitCall:
    """One limiter evaluation as the store sees it: a key, an algorithm and its numbers."""

    key: str
    strategy: StrategyName
    limit: int  # requests per window / max in flight / token refill per window
    window_ms: int  # window length; lease length for concurrency
    burst: int  # token_bucket ceiling; equals limit for other strategies
    cost: int  # >= 0; 0 checks without consuming
    shadow: bool  # never blocks the batch
    # Unique per request: names sliding-log entries and concurrency leases so they can be removed.
    token: str
    # quota only: when the billing period ends (epoch ms, wall clock); reset/retry count down to
    # it and the counter is kept until 40 days after it.
    period_end_ms: int = 0
    # Units to reserve beyond `cost` if the request is admitted (see RESERVABLE); the store
    # grants at most 1/GRANT_SHARE of what is left and reports the grant in CallResult.granted.
    extra: int = 0


# Built several times per request: not frozen, because a frozen dataclass pays
# object.__setattr__ per field (~0.9 µs more per instance). Treat it as immutable.
@dataclass(slots=True)
class CallResult:
    """Raw outcome of one LimitCall, all times in whole milliseconds (rounded up)."""

    allowed: bool  # this call alone would admit
    remaining: int  # after consumption if the batch committed, else as it stands
    reset_ms: int  # until the window resets / one more unit is available
    retry_ms: int  # until this call would admit (0 when allowed)
    stamp: int = 0  # window start the count went into (lets the cluster store refund exactly)
    used: int = 0  # quota only: units counted this period, overage included (0 otherwise)
    granted: int = 0  # extra units reserved and consumed along with the request's cost


#: Strategies whose units can be reserved ahead (counters; not logs, leases or anything exact
#: per request). A grant never exceeds 1/GRANT_SHARE of what is left after the request, so
#: instances reserving at once cannot drain a limit between them.
RESERVABLE = frozenset({"fixed_window", "sliding_window", "token_bucket", "quota"})
GRANT_SHARE = 16


@dataclass(frozen=True, slots=True)
class Event:
    """One appended event; ids are opaque strings ordered by the store."""

    id: str
    doc: dict[str, Any]


def batch_admits(calls: Sequence[LimitCall], results: Sequence[CallResult]) -> bool:
    """All-or-nothing rule shared by every backend: every non-shadow call admits."""
    return all(r.allowed or c.shadow for c, r in zip(calls, results, strict=True))


def consumed(call: LimitCall, result: CallResult) -> bool:
    """Whether an admitted batch consumed this call: it admitted on its own, or it is a shadow
    quota (overage allowed), which always counts because overage is billed."""
    if call.cost <= 0:
        return False
    return result.allowed or (call.shadow and call.strategy == "quota")


class Store(abc.ABC):
    """Async storage seam. Implementations: local (memory + SQLite), redis, redis_cluster."""

    #: Whether counters are shared between processes (False for the local store).
    shared: bool = False
    #: Prefix of every key this store owns; the limiter builds its keys under it too.
    prefix: str = "sp:"

    @abc.abstractmethod
    async def acquire(self, calls: Sequence[LimitCall]) -> list[CallResult]:
        """Evaluate one request's calls atomically.

        If every non-shadow call admits, every admitting call is consumed; otherwise nothing is.
        A shadow call that would deny is reported but never blocks and is not consumed, except
        a shadow quota call, which is consumed past its limit (overage is billed).
        """

    @abc.abstractmethod
    async def charge(self, calls: Sequence[LimitCall]) -> None:
        """Consume each call's cost unconditionally (post-response debit); no deny."""

    @abc.abstractmethod
    async def refund(self, calls: Sequence[LimitCall], stamps: Sequence[int]) -> None:
        """Give back each call's cost, consumed earlier (reserved units not spent, or a cluster
        request denied on another shard). The stamp says where it was counted: a fixed window
        that has ended is left alone, a sliding window's previous one is reduced, a token bucket
        gets back only what time has not refilled since the stamp (0 = everything)."""

    @abc.abstractmethod
    async def release(self, calls: Sequence[LimitCall]) -> None:
        """Free the concurrency leases named by (key, token, cost); unknown leases are ignored."""

    @abc.abstractmethod
    async def renew(self, calls: Sequence[LimitCall]) -> None:
        """Hold the concurrency leases named by (key, token, cost) until each call's window
        from now. Their requests are still in flight: a lease that is gone (expired, or lost
        with the store's data) is put back, even if that takes the count over the limit."""

    @abc.abstractmethod
    def on_data_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback()` in the background when the store finds that it may have lost its
        data (a Redis restarted empty), so that state held elsewhere is put back: the leases of
        requests still in flight. Found by a call that gets NOSCRIPT (once Redis has answered
        it) and by a heartbeat that finds its instance gone, so every instance learns of it;
        one run at a time, repeated if the store finds out again while it runs."""

    @abc.abstractmethod
    async def heartbeat(self, instance_id: str, ttl_seconds: float) -> int:
        """Mark this instance alive for ttl_seconds (<= 0: leave now); return how many are alive."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers now."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, threads and files. Safe to call twice."""

    # Durable records: keys, tenants, bans, audit, usage. Not on the request hot path.

    # Change notifications between instances (see store/pubsub.py); never on the hot path.

    @abc.abstractmethod
    async def publish(self, channel: str, message: str) -> None:
        """Tell every instance (this one included) that something changed."""

    @abc.abstractmethod
    async def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        """Call `callback(message)` for every message on `channel`, until close()."""

    @abc.abstractmethod
    async def put_record(self, kind: str, record_id: str, doc: dict[str, Any]) -> None:
        """Create or replace one record."""

    @abc.abstractmethod
    async def get_record(self, kind: str, record_id: str) -> dict[str, Any] | None:
        """One record, or None."""

    @abc.abstractmethod
    async def delete_record(self, kind: str, record_id: str) -> bool:
        """Delete one record; True if it existed."""

    @abc.abstractmethod
    async def list_records(self, kind: str) -> list[dict[str, Any]]:
        """Every record of a kind, in no particular order."""

    @abc.abstractmethod
    async def append_event(self, kind: str, doc: dict[str, Any]) -> str:
        """Append an event and return its id."""

    @abc.abstractmethod
    async def list_events(
        self, kind: str, *, since: str | None = None, limit: int = 100
    ) -> list[Event]:
        """Events in append order, strictly after the id `since` when given, at most `limit`."""
