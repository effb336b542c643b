"""The admin client and CLI without a proxy: flag parsing, tables, and a stub admin API."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from click.testing import CliRunner, Result

from shieldproxy.admin_client import AdminClient, AdminError, AdminUnreachable
from shieldproxy.cli import cli
from shieldproxy.cli_admin import (
    format_limit,
    format_table,
    format_time,
    parse_duration,
    parse_limit,
    parse_timestamp,
)
from tests.fixtures.processes import free_port

# --- parsing and formatting ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("3600s", 3600), ("15m", 900), ("2h", 7200), ("30d", 2592000),
     ("1w", 604800), ("1.5h", 5400), (" 2H ", 7200), ("0s", 0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "2x", "-1s", "1h30m", "1e3s", "2 h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_parse_limit() -> None:
    assert parse_limit("token_bucket:10/1s:20") == {
        "strategy": "token_bucket", "requests": 10, "window_seconds": 1, "burst": 20,
    }  # fmt: skip
    assert parse_limit("sliding_window:100/60s") == {
        "strategy": "sliding_window", "requests": 100, "window_seconds": 60,
    }  # fmt: skip
    assert parse_limit("fixed_window:5000/1d")["window_seconds"] == 86400
    assert parse_limit("100/1m")["strategy"] == "sliding_window"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("token_bucket:10", "is not a limit"),
        ("leaky:10/1s", "unknown strategy 'leaky'"),
        ("token_bucket:10/1q", "window '1q' is not a duration"),
        ("sliding_window:10/1s:5", "burst is only meaningful with token_bucket"),
        ("token_bucket:0/1s", "must be > 0"),
        ("fixed_window:10/0s", "must be > 0"),
        ("token_bucket:10/1s:20:30", "is not a limit"),
    ],
)
def test_parse_limit_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_limit(text)


def test_format_limit_round_trips() -> None:
    for text in ("token_bucket:10/1s:20", "sliding_window:100/1m", "fixed_window:7/90s",
                 "concurrency:3/1h", "sliding_log:5/1.5s", "fixed_window:1/2d"):  # fmt: skip
        assert format_limit(parse_limit(text)) == text


def test_timestamps_are_utc_iso() -> None:
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(1700000000.75) == "2023-11-14T22:13:20Z"
    assert format_time(None) == "-"
    assert parse_timestamp("2023-11-14T22:13:20Z") == 1700000000
    assert parse_timestamp("2023-11-14T23:13:20+01:00") == 1700000000
    assert parse_timestamp("2023-11-14T22:13:20") == 1700000000  # naive = UTC
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_timestamp("next tuesday")


def test_format_table_aligns_columns() -> None:
    table = format_table(("ID", "NAME", "N"), [("a", "long name", 1), ("bbbb", None, 22)])
    assert table.splitlines() == [
        "ID    NAME       N",
        "a     long name  1",
        "bbbb  -          22",
    ]


# --- a stub admin API ------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


Reply = tuple[int, Any]  # status, JSON body (bytes are sent raw, None sends no body)


@dataclass
class Stub:
    url: str
    seen: list[Seen] = field(default_factory=list)
    reply: Callable[[Seen], Reply] = lambda seen: (200, {})


@pytest.fixture
def stub() -> Iterator[Stub]:
    server_stub = Stub("")

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(
                self.command, split.path, dict(parse_qsl(split.query)), dict(self.headers.items()),
                json.loads(raw) if raw else None,
            )  # fmt: skip
            server_stub.seen.append(seen)
            status, body = server_stub.reply(seen)
            data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body)
            self.send_response(status)
            if status in (301, 302):
                self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data if isinstance(data, bytes) else data.encode())

        do_GET = do_POST = do_PATCH = do_DELETE = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield server_stub
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_client_sends_token_json_and_query(stub: Stub) -> None:
    stub.reply = lambda seen: (201, {"ok": True})
    client = AdminClient(stub.url + "/", "tok")
    assert client.post("/v1/x", {"a": 1}, query={"q": "a b", "none": None, "n": 2}) == {"ok": True}
    seen = stub.seen[0]
    assert (seen.method, seen.path, seen.query, seen.body) == (
        "POST", "/v1/x", {"q": "a b", "n": "2"}, {"a": 1},
    )  # fmt: skip
    assert seen.headers["Authorization"] == "Bearer tok"
    assert seen.headers["Content-Type"] == "application/json"


def test_client_maps_errors(stub: Stub) -> None:
    client = AdminClient(stub.url, "tok")
    stub.reply = lambda seen: (404, {"error": {"code": "not_found", "message": "no key k1"}})
    with pytest.raises(AdminError) as caught:
        client.get("/v1/keys/k1")
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        404, "not_found", "no key k1",
    )  # fmt: skip
    stub.reply = lambda seen: (502, b"<html>bad gateway</html>")
    with pytest.raises(AdminError) as caught:
        client.get("/")
    assert caught.value.code == "http_502"
    stub.reply = lambda seen: (302, None)  # never replay the token elsewhere
    with pytest.raises(AdminError) as caught:
        client.get("/")
    assert caught.value.status == 302 and len(stub.seen) == 3
    stub.reply = lambda seen: (204, None)
    assert client.delete("/v1/keys/k1") is None
    stub.reply = lambda seen: (200, b"not json")
    with pytest.raises(AdminError, match="bad_response"):
        client.get("/")


def test_client_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AdminUnreachable) as caught:
        AdminClient(url, "tok", timeout=2).get("/v1/keys")
    assert caught.value.url == url and "refused" in caught.value.reason.lower()


# --- the CLI against the stub ----------------------------------------------------------------

KEY = {
    "id": "key_1", "name": "ci", "tenant_id": None, "prefix": "sp_live_ab", "last4": "wxyz",
    "scopes": ["read", "write"], "rate_limits": [], "quota": None, "expires_at": None,
    "metadata": {}, "status": "active", "created_at": 1700000000.0, "updated_at": 1700000000.0,
    "last_used_at": None,
}  # fmt: skip
SECRET = "sp_live_abSECRETSECRETSECRETwxyz"


def run(stub: Stub, *args: str, token: str | None = "tok") -> Result:
    flags = ["--admin-url", stub.url] + (["--admin-token", token] if token else [])
    return CliRunner().invoke(cli, [*args, *flags], env={"SHIELDPROXY_ADMIN_TOKEN": None})


def test_keys_create_sends_parsed_flags_and_shows_secret_once(stub: Stub) -> None:
    stub.reply = lambda seen: (201, {**KEY, "key": SECRET})
    result = run(
        stub, "keys", "create", "--name", "ci", "--scope", "read", "--scope", "write",
        "--limit", "token_bucket:10/1s:20", "--limit", "sliding_window:100/60s",
        "--quota", "1000", "--expires-in", "30d", "--meta", "team=core", "--meta", "env=a=b",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert stub.seen[0].body == {
        "name": "ci",
        "scopes": ["read", "write"],
        "rate_limits": [
            {"strategy": "token_bucket", "requests": 10, "window_seconds": 1, "burst": 20},
            {"strategy": "sliding_window", "requests": 100, "window_seconds": 60},
        ],
        "quota": {"monthly_requests": 1000},
        "expires_in_seconds": 30 * 86400,
        "metadata": {"team": "core", "env": "a=b"},
    }
    assert result.stdout.count(SECRET) == 1
    assert f"secret: {SECRET}" in result.stdout and "shown only now" in result.stdout
    as_json = run(stub, "keys", "create", "--name", "ci", "--json")
    assert json.loads(as_json.stdout)["key"] == SECRET


def test_show_never_prints_a_secret_and_uses_utc(stub: Stub) -> None:
    stub.reply = lambda seen: (200, {**KEY, "expires_at": 1700003600.0})
    result = run(stub, "keys", "show", "key_1")
    assert result.exit_code == 0
    assert stub.seen[0].path == "/v1/keys/key_1"
    assert "2023-11-14T23:13:20Z" in result.stdout and "sp_live_ab...wxyz" in result.stdout


def test_list_all_follows_cursors_and_merges(stub: Stub) -> None:
    pages = {None: ("c1", "key_1"), "c1": ("c2", "key_2"), "c2": (None, "key_3")}

    def reply(seen: Seen) -> Reply:
        cursor, key_id = pages[seen.query.get("cursor")]
        return 200, {"items": [{**KEY, "id": key_id}], "next_cursor": cursor}

    stub.reply = reply
    result = run(stub, "keys", "list", "--all", "--json", "--status", "active", "--limit", "1")
    assert result.exit_code == 0, result.output
    assert [k["id"] for k in json.loads(result.stdout)] == ["key_1", "key_2", "key_3"]
    assert all(s.query["status"] == "active" and s.query["limit"] == "1" for s in stub.seen)
    one_page = run(stub, "keys", "list")
    assert one_page.stdout.splitlines()[0].split() == [
        "ID", "NAME", "TENANT", "STATUS", "PREFIX", "SCOPES", "EXPIRES", "LAST", "USED",
    ]  # fmt: skip
    assert "more: --cursor c1" in one_page.stderr


def test_update_sends_only_given_fields(stub: Stub) -> None:
    stub.reply = lambda seen: (200, KEY)
    result = run(stub, "keys", "update", "key_1", "--no-quota", "--no-expiry", "--name", "n")
    assert result.exit_code == 0, result.output
    assert stub.seen[0].method == "PATCH"
    assert stub.seen[0].body == {"name": "n", "quota": None, "expires_at": None}
    assert run(stub, "keys", "update", "key_1").exit_code == 2
    assert run(stub, "keys", "update", "key_1", "--quota", "5", "--no-quota").exit_code == 2
    assert len(stub.seen) == 1


def test_api_error_is_one_line_exit_1(stub: Stub) -> None:
    stub.reply = lambda seen: (404, {"error": {"code": "not_found", "message": "no key nope"}})
    result = run(stub, "keys", "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "shieldproxy: not_found: no key nope\n" and result.stdout == ""


def test_unreachable_is_exit_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli, ["tenants", "list", "--admin-url", url, "--admin-token", "t"])
    assert result.exit_code == 3
    assert result.stderr.startswith(f"shieldproxy: cannot reach the admin API at {url}: ")
    assert len(result.stderr.splitlines()) == 1


def test_bad_limit_is_usage_error_before_any_request(stub: Stub) -> None:
    result = run(stub, "keys", "create", "--name", "x", "--limit", "token_bucket:ten/1s")
    assert result.exit_code == 2 and "is not a limit" in result.stderr
    bad_meta = run(stub, "tenants", "create", "--name", "x", "--plan", "p", "--meta", "novalue")
    assert bad_meta.exit_code == 2 and "'novalue' is not KEY=VALUE" in bad_meta.stderr
    both = run(
        stub, "keys", "create", "--name", "x", "--expires-in", "1d", "--expires-at", "2030-01-01"
    )
    assert both.exit_code == 2 and "not both" in both.stderr
    bad_url = CliRunner().invoke(cli, ["keys", "list", "--admin-url", "localhost:8081"])
    assert bad_url.exit_code == 2 and "is not an http:// or https:// URL" in bad_url.stderr
    assert stub.seen == []


def test_revoke_needs_yes_without_a_terminal(stub: Stub) -> None:
    result = run(stub, "keys", "revoke", "key_1")
    assert result.exit_code == 2 and "pass --yes" in result.stderr
    assert stub.seen == []
    stub.reply = lambda seen: (200, {**KEY, "status": "revoked"})
    result = run(stub, "keys", "revoke", "key_1", "--yes")
    assert result.exit_code == 0 and result.stdout == "revoked key key_1\n"
    assert (stub.seen[0].method, stub.seen[0].path) == ("DELETE", "/v1/keys/key_1")


def test_token_comes_from_the_data_dir(stub: Stub, tmp_path: Path) -> None:
    stub.reply = lambda seen: (200, {"items": [], "next_cursor": None})
    (tmp_path / "admin-token").write_text("file-token\n")
    result = CliRunner().invoke(
        cli,
        ["tenants", "list"],
        env={"SHIELDPROXY_ADMIN_URL": stub.url, "SHIELDPROXY_SERVER__DATA_DIR": str(tmp_path)},
    )
    assert result.exit_code == 0, result.output
    assert stub.seen[0].headers["Authorization"] == "Bearer file-token"
    missing = run(stub, "tenants", "list", "--data-dir", str(tmp_path / "nope"), token=None)
    assert missing.exit_code == 2 and len(missing.stderr.splitlines()) == 1
    assert "--admin-token" in missing.stderr and "SHIELDPROXY_ADMIN_TOKEN" in missing.stderr
    assert len(stub.seen) == 1


def test_real_entry_point_prints_one_line(tmp_path: Path) -> None:
    """Through `main()` (not CliRunner): usage errors and unreachable API, never a traceback."""
    root = Path(__file__).resolve().parents[2]

    def shieldproxy(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "shieldproxy.cli", *args],
            capture_output=True, text=True, cwd=tmp_path, timeout=30, check=False,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        )  # fmt: skip

    bad = shieldproxy("keys", "create", "--name", "x", "--limit", "token_bucket:1/1s:x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("shieldproxy: Invalid value for '--limit': ")
    no_token = shieldproxy("keys", "list")  # ./.shieldproxy/admin-token does not exist
    assert no_token.returncode == 2 and no_token.stderr.count("\n") == 1
    assert "no admin token: cannot read .shieldproxy/admin-token (not found)" in no_token.stderr
    url = f"http://127.0.0.1:{free_port()}"
    down = shieldproxy("audit", "--admin-url", url, "--admin-token", "t")
    assert down.returncode == 3
    assert down.stderr == f"shieldproxy: cannot reach the admin API at {url}: connection refused\n"


def test_usage_and_plans_tables(stub: Stub) -> None:
    usage = {
        "key_id": "key_1", "quota_limit": 1000, "quota_used": 12,
        "quota_period_start": 1700000000.0, "quota_period_end": 1702592000.0, "last_used_at": None,
        "limits": [{"name": "key", "strategy": "token_bucket", "limit": 20, "remaining": 19,
                    "reset_seconds": 0.5}],
    }  # fmt: skip
    stub.reply = lambda seen: (200, usage)
    lines = run(stub, "keys", "usage", "key_1").stdout.splitlines()
    assert lines[1].split() == ["key", "token_bucket", "20", "19", "0.5s"]
    assert lines[-1] == "quota: 12/1000 (2023-11-14T22:13:20Z .. 2023-12-14T22:13:20Z)"
    plan = {"name": "free", "limits": [], "monthly_quota": 1000, "overage": "block",
            "price_monthly_cents": 0, "price_per_1k_overage_cents": 0}  # fmt: skip
    stub.reply = lambda seen: (200, [plan])
    assert run(stub, "plans").stdout.splitlines()[1].split() == ["free", "1000", "block", "0", "-"]
