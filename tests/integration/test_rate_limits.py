"""Rate limits end to end: real proxy processes, a real upstream, real Redis."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from tests.client import get
from tests.fixtures.processes import Proxy
from tests.fixtures.redis_servers import RedisServer

ProxyFactory = Callable[..., Proxy]


def limit_config(strategy: str, requests: int, window: float, **extra: object) -> str:
    lines = [
        "[[limits]]",
        'name = "per-ip"',
        'scope = "ip"',
        f'strategy = "{strategy}"',
        f"requests = {requests}",
        f"window_seconds = {window}",
    ]
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


async def burst(port: int, count: int, path: str = "/x", concurrency: int = 200) -> Counter[int]:
    """`count` requests at once (bounded by `concurrency` connections); statuses counted."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                await response.read()
                return response.status

        return Counter(await asyncio.gather(*(one() for _ in range(count))))


def test_headers_and_429_on_the_local_store(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory(limit_config("fixed_window", 3, 60))
    first = get(proxy.port, "/a")
    assert first.status == 200
    assert first.headers["RateLimit-Policy"] == '"per-ip";q=3;w=60'
    assert first.headers["RateLimit"].startswith('"per-ip";r=2;t=')
    assert first.headers["X-RateLimit-Limit"] == "3"
    assert first.headers["X-RateLimit-Remaining"] == "2"
    assert get(proxy.port, "/a").status == 200
    assert get(proxy.port, "/a").status == 200
    denied = get(proxy.port, "/a")
    assert denied.status == 429
    body = denied.json()["error"]
    assert body["code"] == "rate_limited" and body["request_id"] == denied.headers["X-Request-Id"]
    retry_after = int(denied.headers["Retry-After"])
    reset = int(denied.headers["RateLimit"].rsplit("t=", 1)[1])
    assert 1 <= retry_after <= 60 and retry_after >= reset
    assert denied.headers["X-RateLimit-Remaining"] == "0"


def test_legacy_headers_off_and_hidden_headers(proxy_factory: ProxyFactory) -> None:
    quiet = proxy_factory(
        limit_config("fixed_window", 1, 60) + "[rate_limits]\nlegacy_headers = false\n"
    )
    reply = get(quiet.port, "/a")
    assert "RateLimit" in reply.headers and "X-RateLimit-Limit" not in reply.headers
    hidden = proxy_factory(
        limit_config("fixed_window", 1, 60) + "[rate_limits]\nexpose_headers = false\n"
    )
    assert "RateLimit" not in get(hidden.port, "/a").headers
    denied = get(hidden.port, "/a")
    assert denied.status == 429 and "RateLimit" not in denied.headers
    assert int(denied.headers["Retry-After"]) >= 1


def test_our_limit_fields_replace_the_upstreams(proxy_factory: ProxyFactory) -> None:
    """Where shieldproxy limits a route, its RateLimit fields are the ones the client gets, once
    each; elsewhere the upstream's own pass through untouched."""
    limited = get(proxy_factory(limit_config("fixed_window", 5, 60)).port, "/own-limits")
    assert limited.status == 200 and limited.headers["X-Up"] == "1"
    assert limited.headers.get_all("RateLimit") == ['"per-ip";r=4;t=' + limited.headers[
        "X-RateLimit-Reset"]]  # fmt: skip
    assert limited.headers.get_all("X-RateLimit-Remaining") == ["4"]
    plain = get(proxy_factory("[auth]\nrequired = false\n").port, "/own-limits")
    assert plain.headers.get_all("RateLimit") == ['"upstream";r=5;t=1']
    assert plain.headers.get_all("X-RateLimit-Remaining") == ["5"]


def test_route_limits_cost_and_shadow(proxy_factory: ProxyFactory) -> None:
    config = (
        "[[limits]]\n"
        'name = "watch"\nscope = "global"\nstrategy = "fixed_window"\n'
        "requests = 1\nwindow_seconds = 60\nshadow = true\n"
        "[[routes]]\n"
        'name = "chat"\npath = "/v1/chat/*"\ncost = 2\n'
        'limits = [{ name = "chat", scope = "route", strategy = "fixed_window", '
        "requests = 4, window_seconds = 60 }]\n"
    )
    proxy = proxy_factory(config)
    assert [get(proxy.port, "/v1/chat/x").status for _ in range(3)] == [200, 200, 429]
    # shadow rules never deny (and are not advertised), elsewhere too
    assert all(get(proxy.port, "/other").status == 200 for _ in range(3))
    metrics = get(
        proxy.admin_port, "/metrics", headers={"Authorization": f"Bearer {proxy.admin_token}"}
    ).body.decode()
    assert 'decision="shadow_deny"' in metrics
    assert 'shieldproxy_ratelimit_events_total{event="shadow_denied"}' in metrics


def test_spoofed_forwarding_and_path_variants_share_one_bucket(
    proxy_factory: ProxyFactory,
) -> None:
    config = (
        "[[routes]]\n"
        'name = "items"\npath = "/v1/items"\n'
        'limits = [{ name = "items", scope = "ip", strategy = "fixed_window", '
        "requests = 5, window_seconds = 60 }]\n"
    )
    proxy = proxy_factory(config)
    variants = ["/v1/items", "//v1//items", "/v1/./items", "/v1/it%65ms", "/v1/items/", "/V1/Items"]
    statuses = [
        get(
            proxy.port, path, headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": "6.6.6.6"}
        ).status
        for i, path in enumerate(variants)
    ]
    assert statuses == [200] * 5 + [429]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fixed_window", "sliding_log"])
def test_four_workers_on_one_redis_forward_exactly_the_limit(
    proxy_factory: ProxyFactory, flush_redis: RedisServer, strategy: str
) -> None:
    # A generous storage budget: 4 workers saturate 2 cores here, and a call that times out
    # would be answered by the local fallback (the accuracy trade-off of on_store_error=local).
    proxy = proxy_factory(
        limit_config(strategy, 100, 30) + "[store]\ntimeout_seconds = 2.0\n",
        args=("--workers", "4", "--store", flush_redis.url),
    )
    wait_workers(proxy, 4)
    statuses = asyncio.run(burst(proxy.port, 1000))
    assert statuses == Counter({200: 100, 429: 900})


def test_a_concurrency_slot_is_held_as_long_as_its_request_runs(
    proxy_factory: ProxyFactory, flush_redis: RedisServer
) -> None:
    """One slot with a 1 s lease: a request running 2.5 s keeps it past the lease (renewed), so
    a second request meanwhile is turned away; once the first ends, the slot is free again."""
    proxy = proxy_factory(limit_config("concurrency", 1, 1), args=("--store", flush_redis.url))

    async def scenario() -> tuple[int, int, str, int]:
        async with aiohttp.ClientSession() as session:

            async def fetch(path: str) -> tuple[int, dict[str, object]]:
                async with session.get(f"http://127.0.0.1:{proxy.port}{path}") as response:
                    body = await response.read()
                    is_json = response.content_type == "application/json"
                    return response.status, orjson.loads(body) if is_json else {}

            slow = asyncio.create_task(fetch("/slow?seconds=2.5"))
            await asyncio.sleep(1.7)  # the first lease, as granted, ended 0.7 s ago
            during, denial = await fetch("/x")
            slow_status, _ = await slow
            after, _ = await fetch("/x")
            code = denial.get("error", {}).get("code", "")  # type: ignore[union-attr]
            return slow_status, during, str(code), after

    slow_status, during, code, after = asyncio.run(scenario())
    assert (slow_status, during, code, after) == (200, 429, "concurrency_limited", 200)


@pytest.mark.slow
def test_a_redis_restarted_empty_gets_the_slots_of_running_requests_back(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    """A Redis restarted empty has forgotten the leases of requests still running. The proxy
    puts them back as soon as it sees the restart (the scripts are gone too), not at their next
    renewal half a lease later, so a running request's slot is not given away meanwhile."""
    proxy = proxy_factory(limit_config("concurrency", 1, 60), args=("--store", fault_redis.url))

    async def scenario() -> tuple[int, int, list[int]]:
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:

            async def fetch(path: str) -> tuple[int, bool]:
                async with session.get(f"http://127.0.0.1:{proxy.port}{path}") as response:
                    await response.read()
                    return response.status, "X-Shield-Degraded" in response.headers

            slow = asyncio.create_task(fetch("/slow?seconds=4"))
            await asyncio.sleep(0.5)
            before, _ = await fetch("/x")
            await loop.run_in_executor(None, fault_redis.restart_empty)
            by_redis: list[int] = []  # answers after the restart that Redis decided
            deadline = loop.time() + 3
            while len(by_redis) < 4 and loop.time() < deadline:
                status, degraded = await fetch("/x")
                if not degraded:
                    by_redis.append(status)
                await asyncio.sleep(0.05)
            slow_status, _ = await slow
            return before, slow_status, by_redis

    before, slow_status, by_redis = asyncio.run(scenario())
    assert (before, slow_status) == (429, 200)
    # The request whose call found Redis empty may pass (the lease is put back after it).
    assert len(by_redis) == 4 and by_redis[1:] == [429, 429, 429], by_redis
    assert get(proxy.port, "/x").status == 200  # the slow request ended: its slot is free
    assert "Traceback" not in proxy.log()


def wait_workers(proxy: Proxy, count: int) -> None:
    seen: set[int] = set()
    deadline = time.monotonic() + 20
    while len(seen) < count:
        assert time.monotonic() < deadline, f"only workers {seen} answered"
        seen.add(get(proxy.admin_port, "/readyz").json()["worker"])


@pytest.mark.slow
def test_token_bucket_admits_burst_plus_refill(
    proxy_factory: ProxyFactory, flush_redis: RedisServer
) -> None:
    proxy = proxy_factory(
        limit_config("token_bucket", 20, 1, burst=50) + "[store]\ntimeout_seconds = 2.0\n",
        args=("--workers", "2", "--store", flush_redis.url),
    )
    wait_workers(proxy, 2)
    started = time.monotonic()
    first = asyncio.run(burst(proxy.port, 300))
    elapsed = time.monotonic() - started
    assert 50 <= first[200] <= 50 + 20 * elapsed + 1
    time.sleep(1.0)
    second = asyncio.run(burst(proxy.port, 100))
    assert 19 <= second[200] <= 21 + 20 * (time.monotonic() - started - elapsed)


@pytest.mark.slow
def test_sustained_overload_gets_the_limit_each_window(
    proxy_factory: ProxyFactory, flush_redis: RedisServer
) -> None:
    proxy = proxy_factory(limit_config("fixed_window", 20, 1), args=("--store", flush_redis.url))

    async def overload() -> list[int]:
        admitted = []
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                window_start = time.monotonic()
                ok = 0
                while time.monotonic() - window_start < 1.0:
                    statuses = await asyncio.gather(
                        *(session.get(f"{proxy.url}/x") for _ in range(8))
                    )
                    ok += sum(r.status == 200 for r in statuses)
                    for r in statuses:
                        r.release()
                    await asyncio.sleep(0.05)
                admitted.append(ok)
        return admitted

    admitted = asyncio.run(overload())
    # 2x overload and more: every one-second span still gets its share, never zero
    assert all(15 <= n <= 45 for n in admitted), admitted


def _load(port: int, seconds: float) -> tuple[Counter[int], float]:
    """Steady requests for `seconds`; statuses counted, slowest request time returned."""

    async def run() -> tuple[Counter[int], float]:
        statuses: Counter[int] = Counter()
        slowest = 0.0
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                began = time.monotonic()
                async with session.get(f"http://127.0.0.1:{port}/x") as response:
                    await response.read()
                    statuses[response.status] += 1
                slowest = max(slowest, time.monotonic() - began)
                await asyncio.sleep(0.01)
        return statuses, slowest

    return asyncio.run(run())


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "pause", "restart_empty"])
def test_redis_faults_never_hang_and_limiting_resumes(
    proxy_factory: ProxyFactory, fault_redis: RedisServer, fault: str
) -> None:
    proxy = proxy_factory(
        limit_config("fixed_window", 1000, 60) + "[store]\ntimeout_seconds = 0.05\n",
        args=("--store", fault_redis.url),
    )
    before, _ = _load(proxy.port, 0.5)
    assert before == Counter({200: before.total()})
    if fault == "kill":
        fault_redis.kill9()
    elif fault == "pause":
        fault_redis.pause()
    else:
        fault_redis.restart_empty()
    during, slowest = _load(proxy.port, 1.5)
    # local fallback: still answered, never a 5xx or a 429 caused by the fault, never slow
    assert set(during) == {200}, during
    assert slowest < 0.5, slowest
    if fault != "restart_empty":
        ready = get(proxy.admin_port, "/readyz").json()
        assert ready["degraded"] is True and ready["status"] == "degraded"
    if fault == "kill":
        fault_redis.start()
    elif fault == "pause":
        fault_redis.resume()
    deadline = time.monotonic() + 10
    while get(proxy.admin_port, "/readyz").json()["degraded"]:
        assert time.monotonic() < deadline, "never recovered"
        get(proxy.port, "/x")
        time.sleep(0.1)
    after = get(proxy.port, "/x")
    assert after.status == 200 and "X-Shield-Degraded" not in after.headers
    keys = fault_redis.cli("KEYS", "sp:rl:*")
    assert keys, "limits are counted in Redis again after recovery"
    assert "Traceback" not in proxy.log()


@pytest.mark.slow
def test_closed_policy_answers_503_when_redis_is_down(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    proxy = proxy_factory(
        limit_config("fixed_window", 1000, 60, on_store_error='"closed"'),
        args=("--store", fault_redis.url),
    )
    assert get(proxy.port, "/x").status == 200
    fault_redis.kill9()
    reply = get(proxy.port, "/x")
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "store_unavailable"
    assert int(reply.headers["Retry-After"]) >= 1


@pytest.mark.slow
def test_open_policy_lets_traffic_pass_when_redis_is_down(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    proxy = proxy_factory(
        limit_config("fixed_window", 2, 60, on_store_error='"open"'),
        args=("--store", fault_redis.url),
    )
    fault_redis.kill9()
    assert [get(proxy.port, "/x").status for _ in range(5)] == [200] * 5


def test_a_client_that_hangs_up_frees_its_slot_and_its_upstream_at_once(
    proxy_factory: ProxyFactory, flush_redis: RedisServer
) -> None:
    """The client of a slow request goes away: its concurrency slot is free for the next
    request at once (not when the upstream would have answered), and it counts as a 499."""
    proxy = proxy_factory(limit_config("concurrency", 1, 60), args=("--store", flush_redis.url))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as hung_up:
        hung_up.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.5)  # admitted, waiting on the upstream
        assert get(proxy.port, "/x").status == 429  # the one slot is taken
    started = time.monotonic()
    while (status := get(proxy.port, "/x").status) != 200 and time.monotonic() - started < 5:
        time.sleep(0.05)
    assert status == 200 and time.monotonic() - started < 2
    token = {"Authorization": f"Bearer {proxy.admin_token}"}
    metrics = get(proxy.admin_port, "/metrics", headers=token).body.decode()
    assert re.search(r'shieldproxy_requests_total\{decision="cancelled".*\} 1\.0', metrics)
    assert "Traceback" not in proxy.log()


def test_a_stream_cut_short_by_its_client_counts_as_the_status_it_was_sent_with(
    proxy_factory: ProxyFactory,
) -> None:
    """As nginx logs it: 499 only for a client gone before its answer began. Here the client
    hangs up while the proxy waits for the next event of a stream already answered 200 (so
    aiohttp cancels the handler rather than a write failing)."""
    proxy = proxy_factory()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(b"GET /sse?n=50&delay=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
        head = client.recv(65536)
        while b"data: event 0" not in head:
            head += client.recv(65536)
        assert head.startswith(b"HTTP/1.1 200 ")
    token = {"Authorization": f"Bearer {proxy.admin_token}"}
    pattern = (
        r'shieldproxy_requests_total\{decision="(\w+)",route="[^"]*",status_class="(\w+)"\} 1\.0'
    )
    deadline = time.monotonic() + 5
    while not (
        counted := re.findall(
            pattern, get(proxy.admin_port, "/metrics", headers=token).body.decode()
        )
    ):
        assert time.monotonic() < deadline, "the request was never counted"
        time.sleep(0.05)
    assert counted == [("allow", "2xx")]
    assert "Traceback" not in proxy.log()
