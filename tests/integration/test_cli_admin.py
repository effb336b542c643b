"""The admin CLI against a real `shieldproxy serve`: tenants, keys, audit, and error exits."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shieldproxy.cli import cli
from tests.client import Reply, get
from tests.fixtures.processes import Proxy, free_port

ProxyFactory = Callable[..., Proxy]
PLANS = "[plans.free]\nmonthly_quota = 1000\n\n[plans.pro]\nmonthly_quota = 100000\n"
# No ambient settings may leak into a run: each test says where the API is and how to log in.
CLEAN_ENV: dict[str, str | None] = {
    "SHIELDPROXY_ADMIN_URL": None,
    "SHIELDPROXY_ADMIN_TOKEN": None,
    "SHIELDPROXY_SERVER__DATA_DIR": None,
}


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> Proxy:
    return proxy_factory(PLANS, auth=True)


def admin(proxy: Proxy, *args: str) -> Result:
    flags = ("--admin-url", proxy.admin_url, "--admin-token", proxy.admin_token)
    return CliRunner().invoke(cli, [*args, *flags], env=CLEAN_ENV)


def ok(proxy: Proxy, *args: str) -> Result:
    result = admin(proxy, *args)
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result


def doc(proxy: Proxy, *args: str) -> Any:
    return json.loads(ok(proxy, *args, "--json").stdout)


def through_proxy(proxy: Proxy, secret: str) -> Reply:
    return get(proxy.port, "/anything", headers={"Authorization": f"Bearer {secret}"})


def eventually(check: Callable[[], Reply], status: int, timeout: float = 3.0) -> Reply:
    """Key changes reach the proxy's key cache promptly but not necessarily synchronously."""
    deadline = time.monotonic() + timeout
    while (reply := check()).status != status and time.monotonic() < deadline:
        time.sleep(0.05)
    return reply


def test_tenants_and_plans(proxy: Proxy) -> None:
    plans = ok(proxy, "plans").stdout.splitlines()
    assert [line.split()[:2] for line in plans[1:]] == [["free", "1000"], ["pro", "100000"]]

    created = ok(proxy, "tenants", "create", "--name", "Acme Corp", "--plan", "free")
    tenant_id = created.stdout.split()[2]  # "created tenant <id>"
    assert created.stdout.startswith(f"created tenant {tenant_id}\n")
    other = doc(proxy, "tenants", "create", "--name", "Beta", "--plan", "pro", "--anchor-day", "15")
    assert other["anchor_day"] == 15 and other["plan"] == "pro"

    listing = ok(proxy, "tenants", "list").stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "PLAN", "ANCHOR", "DAY", "CREATED"]
    assert any(line.startswith(tenant_id) and "Acme Corp" in line for line in listing)
    assert {t["id"] for t in doc(proxy, "tenants", "list", "--all", "--limit", "1")} == {
        tenant_id, other["id"],
    }  # fmt: skip

    ok(proxy, "tenants", "update", tenant_id, "--plan", "pro", "--anchor-day", "3")
    shown = ok(proxy, "tenants", "show", tenant_id).stdout
    assert "plan        pro" in shown and "anchor day  3" in shown
    assert doc(proxy, "tenants", "show", tenant_id)["plan"] == "pro"

    bad_plan = admin(proxy, "tenants", "update", tenant_id, "--plan", "platinum")
    assert bad_plan.exit_code == 1 and len(bad_plan.stderr.splitlines()) == 1
    assert bad_plan.stderr.startswith("shieldproxy: ") and "Traceback" not in bad_plan.output

    assert ok(proxy, "tenants", "delete", tenant_id, "--yes").stdout == (
        f"deleted tenant {tenant_id}\n"
    )
    gone = admin(proxy, "tenants", "show", tenant_id)
    assert gone.exit_code == 1
    assert gone.stderr.startswith("shieldproxy: not_found: ") and gone.stderr.count("\n") == 1


def test_keys_lifecycle_through_the_proxy(proxy: Proxy) -> None:
    tenant = doc(proxy, "tenants", "create", "--name", "Acme", "--plan", "free")
    created = ok(
        proxy, "keys", "create", "--name", "ci", "--tenant", tenant["id"],
        "--scope", "read", "--scope", "write", "--limit", "token_bucket:10/1s:20",
        "--limit", "sliding_window:100/60s", "--quota", "500", "--expires-in", "30d",
        "--meta", "team=core",
    ).stdout  # fmt: skip
    secret = next(line for line in created.splitlines() if line.startswith("secret: "))[8:]
    assert created.count(secret) == 1 and "shown only now" in created
    key_id = created.split()[2]  # "created key <id>"
    assert through_proxy(proxy, secret).status == 200

    shown = ok(proxy, "keys", "show", key_id).stdout
    assert secret not in shown
    assert "token_bucket:10/1s:20 sliding_window:100/1m" in shown and "500/month" in shown
    key = doc(proxy, "keys", "show", key_id)
    assert key["tenant_id"] == tenant["id"] and key["metadata"] == {"team": "core"}
    assert 29 * 86400 < key["expires_at"] - time.time() <= 30 * 86400
    assert "key" not in key

    second = doc(proxy, "keys", "create", "--name", "other")
    assert second["key"].startswith("sp_") and second["scopes"] == ["read"]
    listing = ok(proxy, "keys", "list", "--tenant", tenant["id"]).stdout
    assert key_id in listing and second["id"] not in listing and secret not in listing
    every = doc(proxy, "keys", "list", "--all", "--limit", "1")
    assert {k["id"] for k in every} == {key_id, second["id"]}

    updated = doc(proxy, "keys", "update", key_id, "--name", "ci-2", "--no-quota", "--no-expiry")
    assert (updated["name"], updated["quota"], updated["expires_at"]) == ("ci-2", None, None)
    assert len(updated["rate_limits"]) == 2  # untouched

    rotated = ok(proxy, "keys", "rotate", key_id, "--grace", "1h").stdout
    new_secret = next(line for line in rotated.splitlines() if line.startswith("secret: "))[8:]
    assert new_secret != secret and rotated.startswith(f"rotated key {key_id}")
    assert eventually(lambda: through_proxy(proxy, new_secret), 200).status == 200
    assert through_proxy(proxy, secret).status == 200  # within the grace period

    refused = admin(proxy, "keys", "revoke", key_id)  # no terminal to confirm on
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert ok(proxy, "keys", "revoke", key_id, "--yes").stdout == f"revoked key {key_id}\n"
    denied = eventually(lambda: through_proxy(proxy, new_secret), 401)
    assert denied.status == 401 and denied.json()["error"]["code"] == "revoked_key"
    assert doc(proxy, "keys", "list", "--status", "revoked")["items"][0]["id"] == key_id

    entries = doc(proxy, "audit", "--all")
    actions = [(e["action"], e["target"]) for e in entries]
    for action in ("key.create", "key.update", "key.rotate", "key.revoke"):
        assert (action, key_id) in actions
    assert ("tenant.create", tenant["id"]) in actions
    assert all(secret not in json.dumps(e) and new_secret not in json.dumps(e) for e in entries)
    table = ok(proxy, "audit", "--action", "key.rotate", "--target", key_id).stdout.splitlines()
    assert table[0].split() == ["AT", "ACTION", "TARGET", "ACTOR", "IP"]
    assert len(table) == 2 and table[1].split()[1:3] == ["key.rotate", key_id]
    assert table[1].split()[0].endswith("Z")


def test_local_instance_needs_only_its_data_dir(proxy: Proxy) -> None:
    runner = CliRunner()
    env = {**CLEAN_ENV, "SHIELDPROXY_ADMIN_URL": proxy.admin_url}
    created = runner.invoke(
        cli, ["keys", "create", "--name", "local", "--data-dir", str(proxy.data_dir)], env=env
    )
    assert created.exit_code == 0, created.output
    env["SHIELDPROXY_SERVER__DATA_DIR"] = str(proxy.data_dir)
    listed = runner.invoke(cli, ["keys", "list"], env=env)
    assert listed.exit_code == 0 and "local" in listed.stdout
    wrong = runner.invoke(cli, ["keys", "list", "--admin-token", "not-the-token"], env=env)
    assert wrong.exit_code == 1 and wrong.stderr.startswith("shieldproxy: unauthorized: ")


def test_error_exits(proxy: Proxy) -> None:
    unknown = admin(proxy, "keys", "show", "key_doesnotexist")
    assert unknown.exit_code == 1 and unknown.stdout == ""
    assert unknown.stderr.startswith("shieldproxy: not_found: ") and unknown.stderr.count("\n") == 1
    assert admin(proxy, "keys", "revoke", "key_doesnotexist", "--yes").exit_code == 1

    bad_limit = admin(proxy, "keys", "create", "--name", "x", "--limit", "token_bucket:10/soon")
    assert bad_limit.exit_code == 2 and "is not a duration" in bad_limit.output
    assert doc(proxy, "keys", "list")["items"] == []  # nothing was sent

    url = f"http://127.0.0.1:{free_port()}"
    unreachable = CliRunner().invoke(
        cli, ["keys", "list", "--admin-url", url, "--admin-token", "x"], env=CLEAN_ENV
    )
    assert unreachable.exit_code == 3
    assert unreachable.stderr.startswith(f"shieldproxy: cannot reach the admin API at {url}: ")
    assert unreachable.stderr.count("\n") == 1
