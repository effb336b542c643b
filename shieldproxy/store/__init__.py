"""The storage seam: pick and open a backend from a store URL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from shieldproxy.store.base import (
    CallResult,
    CircuitOpen,
    Event,
    LimitCall,
    Store,
    StoreConnectionError,
    StoreError,
    StoreMisuse,
    StoreRefused,
    StoreTimeout,
    StoreUnavailable,
)
from shieldproxy.store.urls import parse_redis_url, redact

__all__ = [
    "CallResult",
    "CircuitOpen",
    "Event",
    "LimitCall",
    "Store",
    "StoreConnectionError",
    "StoreError",
    "StoreMisuse",
    "StoreRefused",
    "StoreTimeout",
    "StoreUnavailable",
    "open_store",
    "refusal_at_start",
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
        case "redis" | "rediss" | "redis+cluster" | "rediss+cluster":
            target = parse_redis_url(url)
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
            if target.cluster:
                from shieldproxy.store.redis_cluster import RedisClusterStore

                return RedisClusterStore.from_target(target, **common)
            from shieldproxy.store.redis import RedisStore

            return RedisStore.from_target(target, **common)
        case _:
            raise ValueError(
                f"store url {redact(url)!r}: unknown scheme {scheme!r}; use local, redis://, "
                "rediss://, redis+cluster://host:port,host:port or rediss+cluster://"
            )


async def refusal_at_start(store: Store, timeout_seconds: float = 5.0) -> str | None:
    """Why the store turns this instance down (password, TLS certificate), or None.

    A store that is merely unreachable is an outage: the instance starts and answers by each
    rule's `on_store_error` until the store is back. A refusal will not heal by waiting, so
    serve stops with it instead of running degraded behind a misconfigured URL.
    """
    try:
        async with asyncio.timeout(timeout_seconds):
            await store.ping()
    except StoreRefused as exc:
        return str(exc)
    except (StoreError, TimeoutError) as exc:
        reason = str(exc) or "no answer in time"
        if "reset by peer" in reason:
            # What a TLS-only port says to plain text, and a TLS 1.3 server to a client
            # without the certificate it asks for: indistinguishable from a crash here.
            reason += "; a TLS server needs rediss:// (and ssl_certfile if it asks for one)"
        logging.getLogger(__name__).warning(
            "store not reachable at start (%s); limits follow on_store_error until it is", reason
        )
    return None
