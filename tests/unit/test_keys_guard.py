"""UnknownKeyGuard: lookups of keys that do not exist are bounded per client address."""

from __future__ import annotations

from shieldproxy.keys.guard import UnknownKeyGuard


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_an_address_gets_its_allowance_at_once_then_one_per_interval() -> None:
    clock = Clock()
    guard = UnknownKeyGuard(6, clock=clock)  # 6 a minute: one every 10 s after the first six
    for _ in range(6):
        assert guard.retry_after("198.51.100.1") is None
        guard.charge("198.51.100.1")
    wait = guard.retry_after("198.51.100.1")
    assert wait is not None and abs(wait - 10.0) < 1e-9
    assert guard.retry_after("198.51.100.2") is None  # other addresses are not affected
    clock.t += 10.0
    assert guard.retry_after("198.51.100.1") is None
    guard.charge("198.51.100.1")
    assert guard.retry_after("198.51.100.1") is not None
    clock.t += 60.0  # quiet for a minute: the whole allowance is back
    for _ in range(6):
        assert guard.retry_after("198.51.100.1") is None
        guard.charge("198.51.100.1")


def test_memory_is_bounded_by_forgetting_the_oldest_address() -> None:
    guard = UnknownKeyGuard(1, max_entries=3, clock=Clock())
    for i in range(5):
        guard.charge(f"203.0.113.{i}")
    assert len(guard) == 3
    assert guard.retry_after("203.0.113.0") is None  # forgotten
    assert guard.retry_after("203.0.113.4") is not None


def test_a_lookup_that_found_a_key_is_forgiven() -> None:
    clock = Clock()
    guard = UnknownKeyGuard(2, clock=clock)
    guard.charge("198.51.100.1")
    guard.charge("198.51.100.1")
    assert guard.retry_after("198.51.100.1") is not None  # two lookups in flight: full
    guard.forgive("198.51.100.1")  # one of them found its key
    assert guard.retry_after("198.51.100.1") is None
    guard.forgive("198.51.100.1")
    assert len(guard) == 0  # nothing owed: the address is forgotten


def test_the_whole_allowance_is_usable_whatever_the_rate() -> None:
    """Sums of 60/n drift by a few ulps; that must not cost an address one of its n."""
    for per_minute in (7, 100, 300, 600, 1000):
        guard = UnknownKeyGuard(per_minute, clock=Clock())
        for _ in range(per_minute):
            assert guard.retry_after("192.0.2.1") is None, per_minute
            guard.charge("192.0.2.1")
        assert guard.retry_after("192.0.2.1") is not None
