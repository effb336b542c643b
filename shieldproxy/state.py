"""What one worker process shares between requests: the live Runtime and counters."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from yarl import URL

from shieldproxy.admin.audit import AuditLog
from shieldproxy.config import Config
from shieldproxy.forward import Forwarder, ForwardSettings
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.limits.engine import RateLimiter
from shieldproxy.metrics import ProxyMetrics
from shieldproxy.pipeline import Pipeline, default_checks
from shieldproxy.store.base import Store
from shieldproxy.upstream import PoolSettings, UpstreamPool

log = logging.getLogger("shieldproxy")


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter."""

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(6)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):010x}"


class Runtime:
    """Everything built from one Config. A reload builds a new one and swaps the reference,
    so a request in flight finishes with the runtime it started with."""

    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        limiter: RateLimiter,
        registry: KeyRegistry,
    ) -> None:
        self.config = config
        upstream = config.upstream
        url = URL(upstream.url)
        self.pool = UpstreamPool(
            url,
            PoolSettings(
                connect_timeout=upstream.connect_timeout_seconds,
                read_timeout=upstream.read_timeout_seconds,
                max_connections=upstream.max_connections,
                max_idle=upstream.max_idle_connections,
                idle_timeout=upstream.idle_timeout_seconds,
            ),
            loop,
        )
        self.forwarder = Forwarder(
            self.pool,
            url,
            ForwardSettings(
                max_body_bytes=config.server.max_body_bytes,
                body_timeout=config.server.body_timeout_seconds,
                preserve_host=upstream.preserve_host,
                charge_header=config.rate_limits.charge_header,
            ),
        )
        self.limiter = limiter
        self.charge_header = config.rate_limits.charge_header
        self.pipeline = Pipeline(default_checks(config, limiter, registry))
        self._ws_session: aiohttp.ClientSession | None = None

    def websocket_session(self) -> aiohttp.ClientSession:
        """aiohttp's client, set up for proxying, used only for WebSocket upgrades."""
        if self._ws_session is None:
            upstream = self.config.upstream
            self._ws_session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=upstream.connect_timeout_seconds,
                    sock_read=upstream.read_timeout_seconds,
                ),
            )
        return self._ws_session

    async def close(self, grace_seconds: float = 0.0) -> None:
        """Stop pooling now; give open WebSocket relays `grace_seconds` before cutting them."""
        await self.pool.close()
        if self._ws_session is not None:
            if grace_seconds:
                await asyncio.sleep(grace_seconds)
            await self._ws_session.close()


@dataclass
class ProxyState:
    """Process-wide: the store and limiter outlive reloads; the Runtime is swapped by them."""

    runtime: Runtime
    metrics: ProxyMetrics
    store: Store
    limiter: RateLimiter
    registry: KeyRegistry
    audit: AuditLog
    data_dir: Path
    worker_index: int = 0
    workers: int = 1
    draining: bool = False
    ids: RequestIds = field(default_factory=RequestIds)
