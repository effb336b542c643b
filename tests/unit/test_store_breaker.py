"""Circuit breaker transitions on a fake clock."""

from __future__ import annotations

import pytest

from shieldproxy.store.base import CircuitOpen
from shieldproxy.store.breaker import CircuitBreaker


def test_opens_after_n_failures_then_probes_once() -> None:
    now = [0.0]
    b = CircuitBreaker(failures=3, cooldown_seconds=1.0, clock=lambda: now[0])
    for _ in range(2):
        b.before_call()
        b.failure()
    b.before_call()
    b.success()  # a success resets the count
    for _ in range(3):
        b.before_call()
        b.failure()
    assert b.is_open
    with pytest.raises(CircuitOpen):
        b.before_call()
    now[0] = 1.0
    b.before_call()  # the probe
    with pytest.raises(CircuitOpen):
        b.before_call()  # everyone else still fails fast
    b.failure()  # probe failed: another full cool-down
    now[0] = 1.5
    with pytest.raises(CircuitOpen):
        b.before_call()
    now[0] = 2.0
    b.before_call()
    b.success()
    assert not b.is_open
    b.before_call()


def test_a_cancelled_call_neither_counts_nor_keeps_the_probe() -> None:
    """A client hanging up mid-call says nothing about the store."""
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_seconds=1.0, clock=lambda: now[0])
    for _ in range(5):
        b.abandoned(b.before_call())
    assert not b.is_open  # cancellations are not failures
    early = b.before_call()  # a call started while the breaker was closed...
    for _ in range(2):
        b.before_call()
        b.failure()
    now[0] = 1.0
    probe = b.before_call()
    assert probe and not early
    b.abandoned(early)  # ...cancelled now: the probe in flight stays the only one
    with pytest.raises(CircuitOpen):
        b.before_call()
    b.abandoned(probe)  # the probe is cancelled: the next caller probes, with no cool-down
    assert b.before_call()
    b.success()
    assert not b.is_open
