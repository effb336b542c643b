"""`serve` on a store behind TLS and a password: limits counted there, a refusal stops it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

from tests.client import get
from tests.fixtures.processes import Proxy
from tests.fixtures.redis_servers import SECRET, RedisClusterServers, RedisServer
from tests.integration.test_lifecycle import _worker_pids, eventually
from tests.integration.test_rate_limits import limit_config

ProxyFactory = Callable[..., Proxy]
pytestmark = pytest.mark.timeout(90)


def test_limits_are_counted_on_a_tls_cluster_with_a_password(
    proxy_factory: ProxyFactory, redis_cluster_tls: RedisClusterServers
) -> None:
    redis_cluster_tls.flushall()
    proxy = proxy_factory(
        limit_config("fixed_window", 3, 60), args=("--store", redis_cluster_tls.secure_url())
    )
    statuses = [get(proxy.port, "/x").status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]
    last = get(proxy.port, "/x")
    assert "X-Shield-Degraded" not in last.headers  # counted in the cluster, not the fallback
    counted = [k for n in redis_cluster_tls.nodes for k in n.cli("KEYS", "sp:rl:*").split()]
    assert counted, "no limiter key in the cluster"
    assert SECRET not in proxy.log()


def test_serve_stops_when_the_store_refuses_its_password(
    proxy_factory: ProxyFactory, redis_cluster_tls: RedisClusterServers
) -> None:
    url = redis_cluster_tls.secure_url().replace("s3cret", "not-the-s3cret", 1)
    proxy = proxy_factory(args=("--store", url), wait=False)
    assert proxy.process.wait(30) != 0
    log = proxy.log()
    lines = [line for line in log.splitlines() if "refused this client" in line]
    assert len(lines) == 1, log
    assert "AuthenticationError" in lines[0]
    assert "Traceback" not in log and "not-the-s3cret" not in log


@pytest.mark.slow
def test_a_worker_restarted_after_the_password_changed_joins_its_siblings(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    """A refusal stops serve at start; a worker restarted later runs on the fallback instead
    of making the supervisor stop the workers that still serve."""
    fault_redis.cli("CONFIG", "SET", "requirepass", "before")
    url = fault_redis.url.replace("redis://", "redis://:before@")
    proxy = proxy_factory(args=("--workers", "2", "--store", url))
    workers = eventually(
        lambda: len(_worker_pids(proxy.process.pid)) == 2 and _worker_pids(proxy.process.pid)
    )
    eventually(lambda: proxy.log().count(" proxying ") == 2, 15)  # both past their start
    fault_redis.cli("-a", "before", "CONFIG", "SET", "requirepass", "after")
    os.kill(workers[0], signal.SIGKILL)
    eventually(lambda: "answering by on_store_error until it accepts us" in proxy.log(), 20)
    assert proxy.process.poll() is None
    eventually(lambda: len(_worker_pids(proxy.process.pid)) == 2, 15)
    for _ in range(10):
        assert get(proxy.port, "/x").status == 200
    assert "before" not in proxy.log().replace("before restarting", "")
