"""The storage seam: pick and open a backend from a store URL."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from shieldproxy.store.base import (
    CallResult,
    CircuitOpen,
    Event,
    LimitCall,
    Store,
    StoreConnectionError,
    StoreError,
    StoreMisuse,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = [
    "CallResult",
    "CircuitOpen",
    "Event",
    "LimitCall",
    "Store",
    "StoreConnectionError",
    "StoreError",
    "StoreMisuse",
    "StoreTimeout",
    "StoreUnavailable",
    "open_store",
]


def open_store(
    url: str,
    *,
    data_dir: Path,
    prefix: str = "sp:",
    timeout_seconds: float = 0.05,
    workers: int = 1,
    clock: Callable[[], float] = time.monotonic,
    fake_time: Callable[[], float] | None = None,
    breaker_failures: int = 3,
    breaker_cooldown_seconds: float = 1.0,
) -> Store:
    """Build the store named by `url`; connections open lazily on first use.

    `clock` drives the local store's windows and the wall clock its quota periods (Redis stores
    read Redis TIME instead, so that every instance agrees). `fake_time` is for tests only: it
    replaces the clock everywhere, including the time inside Redis scripts, so that one contract
    suite can step through window edges on every backend. Production never passes it.
    """
    # Imported here so that `local` deployments never import redis-py and vice versa.
    from shieldproxy.store.breaker import CircuitBreaker

    scheme = url.split("://", 1)[0] if "://" in url else url
    match scheme:
        case "local":
            if url != "local":
                raise ValueError(f"store url {url!r}: the local store takes no address")
            if workers > 1:
                raise ValueError(
                    "the local store keeps counters in one process; "
                    "with --workers N use --store redis://..."
                )
            from shieldproxy.store.local import LocalStore

            return LocalStore(
                data_dir=data_dir,
                clock=fake_time or clock,
                wall_clock=fake_time or time.time,
                prefix=prefix,
            )
        case "redis" | "rediss" | "redis+cluster":
            breaker = CircuitBreaker(
                failures=breaker_failures,
                cooldown_seconds=breaker_cooldown_seconds,
                clock=time.monotonic,
            )
            common = {
                "prefix": prefix,
                "timeout_seconds": timeout_seconds,
                "breaker": breaker,
                "clock_override": fake_time,
            }
            if scheme == "redis+cluster":
                from shieldproxy.store.redis_cluster import RedisClusterStore

                return RedisClusterStore.from_nodes(_cluster_nodes(url), **common)
            if not urlsplit(url).hostname and not urlsplit(url).path:
                raise ValueError(f"store url {url!r}: missing host, e.g. redis://127.0.0.1:6379/0")
            from shieldproxy.store.redis import RedisStore

            return RedisStore.from_url(url, **common)
        case _:
            raise ValueError(
                f"store url {url!r}: unknown scheme {scheme!r}; "
                "use local, redis://, rediss:// or redis+cluster://host:port,host:port"
            )


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    rest = url.split("://", 1)[1].split("/", 1)[0]
    nodes: list[tuple[str, int]] = []
    for part in rest.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"store url {url!r}: cluster nodes must be host:port,host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes
