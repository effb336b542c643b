"""Circuit breaker: after repeated store faults, fail fast instead of waiting on a dead server."""

from __future__ import annotations

from collections.abc import Callable

from shieldproxy.store.base import CircuitOpen


class CircuitBreaker:
    """Closed → (N consecutive failures) → open for `cooldown` → one probe → closed or open again.

    Without it a hung Redis would make every request wait the full per-call timeout; with it
    only N requests (and one probe per cool-down) pay that, everyone else gets CircuitOpen at once
    and goes to the caller's fallback policy.
    """

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown_seconds: float = 1.0,
        clock: Callable[[], float],
    ) -> None:
        self._threshold = max(1, failures)
        self._cooldown = cooldown_seconds
        self._clock = clock
        self._failures = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._open_until is not None

    def before_call(self) -> bool:
        """Raise CircuitOpen unless a call may go out now; True if this call is the probe."""
        if self._open_until is None:
            return False
        if self._probing or self._clock() < self._open_until:
            raise CircuitOpen("store circuit open after repeated failures")
        # Half-open: exactly one caller probes; the others keep failing fast until it reports.
        self._probing = True
        return True

    def success(self) -> None:
        self._failures = 0
        self._open_until = None
        self._probing = False

    def abandoned(self, probe: bool) -> None:
        """A call its caller cancelled (a client hung up) says nothing about the store; if it
        was the probe, it gives its turn back and the next call probes instead."""
        if probe:
            self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooldown
            self._probing = False
