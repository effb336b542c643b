"""Contract-suite fixtures: one store per backend (local, redis, redis_cluster) on a fake clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shieldproxy.limits import RateLimiter
from shieldproxy.store import Store, open_store
from tests.fixtures.redis_servers import *  # noqa: F403
from tests.fixtures.redis_servers import RedisClusterServers, RedisServer, app_url

# Aligned to a 60 s boundary so that 1/2/5/10/30/60 s windows start exactly at the fake epoch.
EPOCH = 1_700_000_040.0
# The *_tls backends: the same servers behind TLS and passwords (rediss://, rediss+cluster://).
BACKENDS = ["local", "redis", "redis_cluster", "redis_tls", "redis_cluster_tls"]


class FakeClock:
    def __init__(self, start: float = EPOCH) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Store]:
    kind = request.param
    url = "local"
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        url = server.url
    elif kind == "redis_cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        url = cluster.url
    elif kind == "redis_tls":
        tls: RedisServer = request.getfixturevalue("redis_tls")
        tls.cli("FLUSHALL")
        url = app_url(tls)
    elif kind == "redis_cluster_tls":
        cluster_tls: RedisClusterServers = request.getfixturevalue("redis_cluster_tls")
        cluster_tls.flushall()
        url = cluster_tls.secure_url()
    # Generous budget: the suite checks semantics, the fault tests check the budget.
    s = open_store(url, data_dir=tmp_path, fake_time=clock, timeout_seconds=2.0)
    yield s
    await s.close()


@pytest.fixture
async def limiter(store: Store, clock: FakeClock) -> AsyncIterator[RateLimiter]:
    rl = RateLimiter(store, clock=clock, wall_clock=clock)
    yield rl
    await rl.close()
