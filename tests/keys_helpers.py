"""Helpers for the API key end-to-end tests: admin calls, key requests, a recording upstream."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from shieldproxy.keys.secret import KeyHasher
from tests.client import Reply, request
from tests.fixtures.processes import Proxy
from tests.fixtures.redis_servers import REDIS_SERVER, RedisServer

# Every instance of one deployment hashes with the same server secret; fixed here so a
# test can compute the HMAC a store must hold, and so two instances agree.
KEY_SECRET = "e2e-key-hashing-secret-0123456789"
AUTH_ENV = {"SHIELDPROXY_AUTH__REQUIRED": "true", "SHIELDPROXY_AUTH__KEY_SECRET": KEY_SECRET}


def key_hash(secret: str) -> str:
    """The only form of `secret` a store may hold."""
    return KeyHasher(KEY_SECRET.encode()).hash(secret)


class Admin:
    """The admin API of one proxy, speaking JSON; remembers every secret it was shown."""

    def __init__(self, proxy: Proxy, issued: list[str] | None = None) -> None:
        self.proxy = proxy
        self.token = proxy.admin_token
        self.issued = issued if issued is not None else []

    def call(self, method: str, path: str, body: Any = None) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        return request(self.proxy.admin_port, method, path, headers=headers, body=data)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == status, (method, path, reply.status, reply.body)
        doc = reply.json()
        if isinstance(doc, dict) and "key" in doc:
            self.issued.append(doc["key"])
        return doc

    def tenant(self, plan: str = "free") -> dict[str, Any]:
        return self.ok("POST", "/v1/tenants", {"name": "acme", "plan": plan}, 201)  # type: ignore[no-any-return]

    def key(self, **fields: Any) -> dict[str, Any]:
        """A new key (the reply, secret under "key"); name defaults to "k"."""
        return self.ok("POST", "/v1/keys", {"name": "k", **fields}, 201)  # type: ignore[no-any-return]

    def audit(self) -> list[dict[str, Any]]:
        return self.ok("GET", "/v1/audit?limit=200")["items"]  # type: ignore[no-any-return]


def call(
    proxy: Proxy,
    secret: str | None = None,
    path: str = "/echo",
    *,
    method: str = "GET",
    header: str = "Authorization",
    extra: dict[str, str] | None = None,
) -> Reply:
    """One request through the proxy, the key in `Authorization: Bearer` or `X-API-Key`."""
    headers = dict(extra or {})
    if secret is not None:
        headers[header] = f"Bearer {secret}" if header == "Authorization" else secret
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    return request(proxy.port, method, path, headers=headers, body=body, timeout=5.0)


def code(reply: Reply) -> str:
    """The denial code of a proxy error reply ("" for anything else)."""
    try:
        doc = reply.json()
    except ValueError:
        return ""
    error = doc.get("error") if isinstance(doc, dict) else None
    return error.get("code", "") if isinstance(error, dict) else ""


def upstream_headers(reply: Reply) -> dict[str, str]:
    """What the upstream received, from its JSON echo (lower-cased names)."""
    return {k.lower(): v for k, v in reply.json()["headers"]}


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.05) -> float:
    """Poll until `check()` holds; the seconds it took (raises if it never did)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)
    return time.monotonic() - start


def flip_checksum(secret: str) -> str:
    """The same key with its last character changed: well-shaped, bad checksum."""
    return secret[:-1] + ("A" if secret[-1] != "A" else "B")


# ---- an upstream that records what reached it --------------------------------------------


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names


class RecordingUpstream:
    """An echo upstream in this process that keeps every request it was sent."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = [[k, v] for k, v in self.headers.items()]
                seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in headers}))
                body = json.dumps({"method": self.command, "path": self.path, "headers": headers})
                payload = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")  # no idle sockets left at shutdown
                self.end_headers()
                self.wfile.write(payload)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def paths(self, marker: str) -> list[tuple[str, str]]:
        """(method, path) of every request whose path contains `marker`, in arrival order."""
        return [(s.method, s.path) for s in self.seen if marker in s.path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# ---- Redis helpers -----------------------------------------------------------------------


class DurableRedis(RedisServer):
    """A RedisServer with an fsync-always AOF: data survives kill -9 and a start on its dir."""

    def start(self) -> None:
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
            "--dir", str(self.dir), "--protected-mode", "no", "--loglevel", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)


def redis_dump(server: RedisServer) -> bytes:
    """The whole dataset as an uncompressed RDB file (so every stored string appears as is)."""
    assert server.cli("CONFIG", "SET", "rdbcompression", "no") == "OK"
    assert server.cli("SAVE") == "OK"
    name = server.cli("CONFIG", "GET", "dbfilename").splitlines()[-1]
    return (server.dir / name).read_bytes()


def files_bytes(directory: Path) -> dict[str, bytes]:
    """Every regular file under `directory` (SQLite db, -wal, -shm, tokens, snapshots)."""
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@contextmanager
def stats_window(server: RedisServer, seconds: float) -> Iterator[dict[str, int]]:
    """Commands the server ran during a window of exactly `seconds` (from CONFIG RESETSTAT)."""
    calls: dict[str, int] = {}
    assert server.cli("CONFIG", "RESETSTAT") == "OK"
    start = time.monotonic()
    yield calls
    time.sleep(max(0.0, seconds - (time.monotonic() - start)))
    calls.update(server.commandstats())
