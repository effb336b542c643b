"""API keys end to end with real processes, on the local store and on Redis (issue 4's "Done when").

Lifecycle through the admin API and the CLI, scopes by method and route, expiry, rotation grace,
revocation seen by a second instance within a second, durability across restarts, no plaintext
key at rest or in logs, malformed keys costing the store nothing, and Redis going away.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from shieldproxy.cli import cli
from shieldproxy.keys.secret import generate_key
from tests.client import Reply
from tests.fixtures.processes import Proxy, Upstream, start_proxy
from tests.fixtures.redis_servers import RedisServer
from tests.keys_helpers import (
    AUTH_ENV,
    Admin,
    DurableRedis,
    RecordingUpstream,
    call,
    code,
    files_bytes,
    flip_checksum,
    key_hash,
    redis_dump,
    stats_window,
    upstream_headers,
    wait_for,
)

ProxyFactory = Callable[..., Proxy]

CONFIG = """
[plans.free]
monthly_quota = 1000
limits = [{ name = "free-per-tenant", scope = "tenant", strategy = "fixed_window", requests = 1000, window_seconds = 60 }]

[plans.pro]
overage = "allow"

[[routes]]
name = "admin-area"
path = "/admin-area/*"
scopes = ["admin"]

[[routes]]
name = "public"
path = "/public/*"
auth = false
"""
# A global limit, so a request that got past the key check would cost the store a script call.
PER_IP = """
[[limits]]
name = "per-ip"
scope = "ip"
strategy = "sliding_window"
requests = 100000
window_seconds = 60
"""
# Rejected by shape alone. (A Bearer token not starting with `sp_` is not taken for a key
# at all, so those are only sent as X-API-Key.)
MALFORMED = ("sp_live_short", "sp_LIVE_" + "a" * 33, "sp_live_" + "a" * 60, "sp_live_a b")
NOT_KEYS = ("pk_live_" + "a" * 33, "not-a-key-at-all")


@dataclass
class Deployment:
    """One proxy (with its store) shared by the tests of a module, per store kind."""

    store: str
    proxy: Proxy
    admin: Admin
    upstream: RecordingUpstream
    redis: RedisServer | None


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module", params=["local", "redis"])
def deployment(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    recording_upstream: RecordingUpstream,
) -> Iterator[Deployment]:
    store: str = request.param
    redis = RedisServer(tmp_path_factory.mktemp("keys-redis")) if store == "redis" else None
    args = ("--log-level", "debug") + (("--store", redis.url) if redis else ())
    proxy = start_proxy(
        tmp_path_factory.mktemp(f"keys-{store}"),
        recording_upstream.url,
        config=CONFIG,
        args=args,
        env=AUTH_ENV,
    )
    try:
        yield Deployment(store, proxy, Admin(proxy), recording_upstream, redis)
    finally:
        proxy.stop()
        if redis is not None:
            redis.stop()


def assert_denied(reply: Reply, status: int, expected: str) -> None:
    assert (reply.status, code(reply)) == (status, expected), (reply.status, reply.body)
    error = reply.json()["error"]
    assert set(error) == {"code", "message", "request_id"}, error
    if status == 401:
        assert reply.headers["WWW-Authenticate"] == "Bearer"


# ---- 1. lifecycle ------------------------------------------------------------------------


def test_key_lifecycle_through_admin_api_and_proxy(deployment: Deployment) -> None:
    admin, proxy = deployment.admin, deployment.proxy
    tenant = admin.tenant("free")
    created = admin.key(tenant_id=tenant["id"], scopes=["read", "write"])
    secret = created["key"]
    assert secret.startswith("sp_live_") and created["status"] == "active"

    for header in ("Authorization", "X-API-Key"):
        reply = call(proxy, secret, "/echo/lifecycle", header=header)
        assert reply.status == 200, (header, reply.body)
        seen = upstream_headers(reply)
        assert seen["x-shield-key-id"] == created["id"]
        assert seen["x-shield-tenant-id"] == tenant["id"]
        assert seen["x-shield-scopes"] == "read,write"
        assert "authorization" not in seen and "x-api-key" not in seen, seen
        assert secret not in reply.body.decode()
    # The same key in both headers is one key, and neither copy is forwarded.
    both = call(proxy, secret, "/echo/lifecycle", extra={"X-API-Key": secret})
    assert both.status == 200 and secret not in both.body.decode()

    assert_denied(call(proxy, None, "/echo/lifecycle"), 401, "missing_key")
    assert_denied(call(proxy, flip_checksum(secret), "/echo/lifecycle"), 401, "invalid_key")
    for header in ("Authorization", "X-API-Key"):
        assert_denied(call(proxy, "sp_live_nope", "/echo/lifecycle", header=header), 401,
                      "invalid_key")  # fmt: skip
    unknown = generate_key("live")  # well-formed, checksum right, never issued
    assert_denied(call(proxy, unknown, "/echo/lifecycle"), 401, "invalid_key")
    other = admin.key()["key"]
    two = call(proxy, secret, "/echo/lifecycle", extra={"X-API-Key": other})
    assert two.status == 400, two.body
    for denied in (two, call(proxy, unknown, "/echo/lifecycle")):
        assert secret not in denied.body.decode() and unknown not in denied.body.decode()

    assert admin.ok("DELETE", f"/v1/keys/{created['id']}")["status"] == "revoked"
    assert_denied(call(proxy, secret, "/echo/lifecycle"), 401, "revoked_key")
    assert call(proxy, other, "/echo/lifecycle").status == 200  # only the revoked key is out


def test_key_lifecycle_through_the_cli(deployment: Deployment) -> None:
    proxy = deployment.proxy
    env: dict[str, str | None] = {"SHIELDPROXY_ADMIN_URL": None, "SHIELDPROXY_ADMIN_TOKEN": None}

    def run(*args: str) -> dict[str, object]:
        flags = ("--admin-url", proxy.admin_url, "--admin-token", proxy.admin_token, "--json")
        result = CliRunner().invoke(cli, [*args, *flags], env=env)
        assert result.exit_code == 0, f"{args}: {result.output}"
        doc: dict[str, object] = json.loads(result.stdout)
        return doc

    tenant = run("tenants", "create", "--name", "cli-co", "--plan", "pro")
    key = run("keys", "create", "--name", "cli", "--tenant", str(tenant["id"]), "--scope", "read")
    secret = str(key["key"])
    deployment.admin.issued.append(secret)
    reply = call(proxy, secret, "/echo/cli")
    assert reply.status == 200, reply.body
    assert upstream_headers(reply)["x-shield-tenant-id"] == tenant["id"]
    assert upstream_headers(reply)["x-shield-scopes"] == "read"

    rotated = run("keys", "rotate", str(key["id"]))  # grace 0: the old secret stops now
    deployment.admin.issued.append(str(rotated["key"]))
    assert call(proxy, str(rotated["key"]), "/echo/cli").status == 200
    assert_denied(call(proxy, secret, "/echo/cli"), 401, "invalid_key")

    run("keys", "revoke", str(key["id"]), "--yes")
    assert_denied(call(proxy, str(rotated["key"]), "/echo/cli"), 401, "revoked_key")


# ---- 2. scopes ---------------------------------------------------------------------------


def test_scopes_by_method_and_route_deny_before_the_upstream(deployment: Deployment) -> None:
    admin, proxy, upstream = deployment.admin, deployment.proxy, deployment.upstream
    mark = f"scopes-{deployment.store}-{time.monotonic_ns()}"
    read = admin.key(scopes=["read"])["key"]
    write = admin.key(scopes=["write"])["key"]
    both = admin.key(scopes=["read", "write"])["key"]
    root = admin.key(scopes=["admin"])["key"]

    cases = [
        (read, "GET", f"/data/{mark}/1", 200, ""),
        (read, "POST", f"/data/{mark}/2", 403, "insufficient_scope"),
        (read, "DELETE", f"/data/{mark}/3", 403, "insufficient_scope"),
        (write, "POST", f"/data/{mark}/4", 200, ""),
        (write, "GET", f"/data/{mark}/5", 403, "insufficient_scope"),
        (both, "GET", f"/admin-area/{mark}/6", 403, "insufficient_scope"),
        (both, "POST", f"/admin-area/{mark}/7", 403, "insufficient_scope"),
        (root, "GET", f"/admin-area/{mark}/8", 200, ""),
        (root, "POST", f"/data/{mark}/9", 200, ""),  # admin implies read and write
        (None, "GET", f"/public/{mark}/10", 200, ""),
        (None, "POST", f"/public/{mark}/11", 200, ""),
        (None, "GET", f"/data/{mark}/12", 401, "missing_key"),
    ]
    for secret, method, path, status, expected in cases:
        reply = call(proxy, secret, path, method=method)
        assert (reply.status, code(reply)) == (status, expected), (method, path, reply.body)

    # A key on an auth = false route still identifies itself to the upstream.
    public = call(proxy, read, f"/public/{mark}/13")
    assert public.status == 200 and upstream_headers(public)["x-shield-scopes"] == "read"
    anonymous = next(s for s in upstream.seen if s.path == f"/public/{mark}/11")
    assert "x-shield-key-id" not in anonymous.headers, anonymous.headers

    allowed = [(m, p) for _, m, p, status, _ in cases if status == 200]
    assert upstream.paths(mark) == [*allowed, ("GET", f"/public/{mark}/13")]


# ---- 3. and 4. expiry and rotation -------------------------------------------------------


def test_a_key_expires_within_a_second(deployment: Deployment) -> None:
    admin, proxy = deployment.admin, deployment.proxy
    created_at = time.monotonic()
    key = admin.key(expires_in_seconds=1)
    assert call(proxy, key["key"], "/echo/expiry").status == 200

    last: list[Reply] = []

    def refused() -> bool:
        last[:] = [call(proxy, key["key"], "/echo/expiry")]
        return last[0].status != 200

    wait_for(refused, timeout=3.0)
    elapsed = time.monotonic() - created_at
    assert_denied(last[0], 401, "expired_key")
    assert 0.8 <= elapsed <= 1.25, elapsed
    assert admin.ok("GET", f"/v1/keys/{key['id']}")["status"] == "expired"


def test_rotation_keeps_the_old_secret_for_the_grace_only(deployment: Deployment) -> None:
    admin, proxy = deployment.admin, deployment.proxy
    key = admin.key()
    old = key["key"]
    assert call(proxy, old, "/echo/rotate").status == 200  # cached before the rotation
    rotated_at = time.monotonic()
    new = admin.ok("POST", f"/v1/keys/{key['id']}/rotate", {"grace_seconds": 2})["key"]
    assert new != old
    for secret in (old, new):
        reply = call(proxy, secret, "/echo/rotate")
        assert reply.status == 200, reply.body
        assert upstream_headers(reply)["x-shield-key-id"] == key["id"]

    wait_for(lambda: call(proxy, old, "/echo/rotate").status != 200, timeout=4.0)
    elapsed = time.monotonic() - rotated_at
    assert 1.8 <= elapsed <= 2.5, elapsed
    assert_denied(call(proxy, old, "/echo/rotate"), 401, "invalid_key")
    assert call(proxy, new, "/echo/rotate").status == 200


# ---- 7. no plaintext key anywhere --------------------------------------------------------


def test_no_plaintext_key_at_rest_in_logs_or_audit(deployment: Deployment) -> None:
    admin, proxy = deployment.admin, deployment.proxy
    tenant = admin.tenant("pro")
    key = admin.key(tenant_id=tenant["id"], scopes=["read", "write"])
    rotated = admin.ok("POST", f"/v1/keys/{key['id']}/rotate", {"grace_seconds": 60})
    revoked = admin.key()
    admin.ok("DELETE", f"/v1/keys/{revoked['id']}")
    for secret in (key["key"], rotated["key"], revoked["key"]):
        call(proxy, secret, "/echo/plaintext")
        call(proxy, secret, "/echo/plaintext", method="POST", header="X-API-Key")
    time.sleep(0.3)  # let queued writes (last-used, quota) land before looking
    secrets = list(dict.fromkeys(admin.issued))  # every key this module was ever shown
    assert len(secrets) >= 3

    places: dict[str, bytes] = {
        "proxy log": proxy.log().encode(),
        "audit API": admin.call("GET", "/v1/audit?limit=200").body,
        "keys API": admin.call("GET", "/v1/keys?limit=200").body,
    }
    if deployment.redis is not None:
        places["redis dataset"] = redis_dump(deployment.redis)
        stored = places["redis dataset"]
    else:
        data = files_bytes(proxy.data_dir)
        assert any(name.endswith("shieldproxy.db") for name in data), sorted(data)
        places.update(data)
        stored = b"".join(v for k, v in data.items() if "shieldproxy.db" in k)
    # The search can find things: the store does hold the key's id and its HMAC.
    assert key["id"].encode() in stored and key_hash(rotated["key"]).encode() in stored
    assert key["id"].encode() in places["audit API"]
    for where, blob in places.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"a plaintext key in {where}"
            # ... nor the random part alone (e.g. a differently prefixed copy).
            assert secret[8:].encode() not in blob, f"a key's random part in {where}"


# ---- 5. revocation seen by a second instance ----------------------------------------------


def test_revocation_reaches_a_second_instance_within_a_second(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    args = ("--store", fault_redis.url)
    a = proxy_factory(CONFIG, args=args, env=AUTH_ENV, auth=True)
    b = proxy_factory(CONFIG, args=args, env=AUTH_ENV, auth=True)
    key = Admin(a).key(scopes=["read"])
    secret = key["key"]
    assert call(b, secret).status == 200  # B loads the key from Redis and caches it
    fault_redis.cli("CONFIG", "RESETSTAT")
    for _ in range(5):
        assert call(b, secret).status == 200
    reads = {c: n for c, n in fault_redis.commandstats().items() if c.startswith("h")}
    assert reads == {}, f"B re-read a cached key from Redis: {reads}"

    started = time.monotonic()
    assert Admin(a).ok("DELETE", f"/v1/keys/{key['id']}")["status"] == "revoked"
    elapsed = wait_for(lambda: call(b, secret).status == 401, timeout=3.0)
    total = time.monotonic() - started
    assert total < 1.0, f"B still accepted the revoked key {total:.2f}s later"
    assert elapsed < 1.0
    assert_denied(call(b, secret), 401, "revoked_key")
    assert_denied(call(a, secret), 401, "revoked_key")


# ---- 6. durability across restarts --------------------------------------------------------


def _make_state(admin: Admin, proxy: Proxy) -> dict[str, object]:
    """Tenant, an active key used 3 times (quota counted), a revoked key; what to expect."""
    tenant = admin.tenant("free")
    key = admin.key(tenant_id=tenant["id"], quota={"monthly_requests": 100})
    gone = admin.key(tenant_id=tenant["id"])
    admin.ok("DELETE", f"/v1/keys/{gone['id']}")
    for _ in range(3):
        assert call(proxy, key["key"], "/echo/durable").status == 200
    usage = admin.ok("GET", f"/v1/keys/{key['id']}/usage")
    assert usage["quota_limit"] == 100 and usage["quota_used"] == 3, usage
    return {
        "tenant": tenant,
        "key": {k: v for k, v in admin.ok("GET", f"/v1/keys/{key['id']}").items()
                if k != "last_used_at"},
        "secret": key["key"],
        "gone": gone,
        "audit": admin.audit(),
    }  # fmt: skip


def _check_state(
    admin: Admin, proxy: Proxy, before: dict[str, object], *, last_used: bool = True
) -> None:
    tenant, key, gone = before["tenant"], before["key"], before["gone"]
    assert isinstance(tenant, dict) and isinstance(key, dict) and isinstance(gone, dict)
    assert admin.ok("GET", f"/v1/tenants/{tenant['id']}") == tenant
    shown = admin.ok("GET", f"/v1/keys/{key['id']}")
    assert {k: v for k, v in shown.items() if k != "last_used_at"} == key
    if last_used:
        assert shown["last_used_at"] is not None, "the key's last use was lost"
    assert admin.ok("GET", f"/v1/keys/{gone['id']}")["status"] == "revoked"
    assert admin.audit() == before["audit"]

    usage = admin.ok("GET", f"/v1/keys/{key['id']}/usage")
    assert usage["quota_used"] == 3, f"quota usage lost across the restart: {usage}"
    reply = call(proxy, str(before["secret"]), "/echo/durable")
    assert reply.status == 200, reply.body
    assert upstream_headers(reply)["x-shield-tenant-id"] == tenant["id"]
    assert_denied(call(proxy, str(gone["key"]), "/echo/durable"), 401, "revoked_key")
    assert admin.ok("GET", f"/v1/keys/{key['id']}/usage")["quota_used"] == 4


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_local_store_state_survives_a_proxy_restart(
    tmp_path: Path, upstream: Upstream, stop: str
) -> None:
    node = tmp_path / "node"
    node.mkdir()
    first = start_proxy(node, upstream.url, config=CONFIG, env=AUTH_ENV)
    try:
        before = _make_state(Admin(first), first)
        if stop == "kill9":
            time.sleep(0.2)  # billable usage is written promptly, not only at shutdown
            first.process.kill()
            first.process.wait(5)
    finally:
        first.stop()
    if stop == "sigterm":
        assert first.process.returncode == 0, first.log()
    second = start_proxy(node, upstream.url, config=CONFIG, env=AUTH_ENV)  # same data dir
    try:
        assert second.data_dir == first.data_dir
        # Last use is batched every few seconds: only a clean stop promises it.
        _check_state(Admin(second), second, before, last_used=stop == "sigterm")
    finally:
        second.stop()


def test_redis_state_survives_a_redis_crash_and_a_new_proxy(
    tmp_path: Path, proxy_factory: ProxyFactory
) -> None:
    redis = DurableRedis(tmp_path)
    try:
        args = ("--store", redis.url)
        first = proxy_factory(CONFIG, args=args, env=AUTH_ENV, auth=True)
        before = _make_state(Admin(first), first)
        first.stop()
        redis.kill9()  # appendfsync always: every acknowledged write is in the AOF
        redis.start()
        assert redis.cli("DBSIZE") != "0"
        # A new proxy with a fresh data dir: everything it knows comes from Redis.
        second = proxy_factory(CONFIG, args=args, env=AUTH_ENV, auth=True)
        assert second.data_dir != first.data_dir
        _check_state(Admin(second), second, before)
    finally:
        redis.stop()


# ---- 8. malformed keys cost the store nothing ---------------------------------------------


def test_malformed_keys_cost_zero_store_commands(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    proxy = proxy_factory(CONFIG + PER_IP, args=("--store", fault_redis.url), env=AUTH_ENV,
                          auth=True)  # fmt: skip
    secret = Admin(proxy).key()["key"]
    assert call(proxy, secret).status == 200  # connections up, scripts loaded
    bad = [flip_checksum(secret), flip_checksum(generate_key("live")), *MALFORMED]
    bad_headers = [
        {header: f"Bearer {b}" if header == "Authorization" else b}
        for b in bad
        for header in ("Authorization", "X-API-Key")
    ] + [{"X-API-Key": b} for b in NOT_KEYS]

    window = 1.5
    with stats_window(fault_redis, window) as quiet:
        pass
    with stats_window(fault_redis, window) as busy:
        started = time.monotonic()
        for i in range(200):
            headers = bad_headers[i % len(bad_headers)]
            reply = call(proxy, extra=headers)
            assert (reply.status, code(reply)) == (401, "invalid_key"), (headers, reply.body)
        assert time.monotonic() - started < window, "the window is too short for the requests"
    # Background work (heartbeats, last-used flushes) may fall in either window, once.
    for command, calls in busy.items():
        assert calls <= quiet.get(command, 0) + 2, (command, busy, quiet)
    assert sum(busy.values()) <= sum(quiet.values()) + 4, (busy, quiet)
    assert not {c for c in busy if c in ("hget", "hgetall", "hmget", "get", "evalsha", "eval")
                and busy[c] > quiet.get(c, 0) + 1}, (busy, quiet)  # fmt: skip

    # The measurement does see per-request commands: one unknown key is one lookup.
    with stats_window(fault_redis, 0) as one:
        assert_denied(call(proxy, generate_key("live")), 401, "invalid_key")
    assert one.get("hget", 0) >= 1, one


# ---- 9. Redis down ------------------------------------------------------------------------


def test_redis_down_serves_cached_keys_and_503s_unknown_ones(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    env = {**AUTH_ENV, "SHIELDPROXY_AUTH__CACHE_TTL_SECONDS": "0.2"}
    proxy = proxy_factory(CONFIG, args=("--store", fault_redis.url), env=env, auth=True)
    admin = Admin(proxy)
    tenant = admin.tenant("free")
    used = admin.key(tenant_id=tenant["id"])["key"]
    never_used = admin.key(tenant_id=tenant["id"])["key"]  # exists in Redis, never looked up
    assert call(proxy, used).status == 200

    fault_redis.kill9()
    time.sleep(0.3)  # past cache_ttl_seconds: only bounded staleness can serve the key now
    for _ in range(3):
        started = time.monotonic()
        reply = call(proxy, used)
        assert reply.status == 200, reply.body
        assert upstream_headers(reply)["x-shield-tenant-id"] == tenant["id"]
        assert time.monotonic() - started < 1.0

    for secret in (never_used, generate_key("live")):
        started = time.monotonic()
        reply = call(proxy, secret)
        assert_denied(reply, 503, "store_unavailable")  # never 401: the key may be fine
        assert reply.headers["Retry-After"]
        assert time.monotonic() - started < 1.0, "a dead store must not hang the request"
    # A malformed key is still refused locally, with the right answer.
    assert_denied(call(proxy, flip_checksum(used)), 401, "invalid_key")


def test_made_up_keys_cost_a_bounded_number_of_lookups(
    proxy_factory: ProxyFactory, fault_redis: RedisServer
) -> None:
    """Anyone can compute a checksum: well-formed keys that do not exist each cost a lookup,
    so an address gets `auth.unknown_keys_per_minute` of them, then 429 with no lookup at all.
    A key that worked before is still looked up and served meanwhile."""
    proxy = proxy_factory(
        CONFIG + "[auth]\nunknown_keys_per_minute = 5\ncache_ttl_seconds = 0.5\n",
        args=("--store", fault_redis.url),
        env=AUTH_ENV,
        auth=True,
    )
    secret = Admin(proxy).key()["key"]
    assert call(proxy, secret).status == 200  # cached from now on; scripts loaded
    for _ in range(5):
        assert_denied(call(proxy, generate_key("live")), 401, "invalid_key")
    window = 1.5
    with stats_window(fault_redis, window) as quiet:
        pass
    with stats_window(fault_redis, window) as busy:
        started = time.monotonic()
        for _ in range(50):
            reply = call(proxy, generate_key("live"))
            assert_denied(reply, 429, "rate_limited")
            assert 1 <= int(reply.headers["Retry-After"]) <= 12
        assert time.monotonic() - started < window, "the window is too short for the requests"
    lookups = ("hget", "hgetall", "hmget", "get")
    assert not {c for c in busy if c in lookups and busy[c] > quiet.get(c, 0) + 1}, (busy, quiet)
    # Its cache entry gone stale, a key that worked before is looked up again, not held back.
    time.sleep(0.6)
    assert call(proxy, secret).status == 200
    assert_denied(call(proxy, generate_key("live")), 429, "rate_limited")
