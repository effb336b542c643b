"""Admin bearer token: where it comes from, how it is checked, how guessing is slowed."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from aiohttp import web

log = logging.getLogger("shieldproxy.admin")

TOKEN_FILE = "admin-token"


def resolve_admin_token(configured: str, data_dir: Path) -> str:
    """The configured token, else `<data-dir>/admin-token`, created (mode 0600) if absent."""
    if configured:
        return configured
    return load_or_create_secret(data_dir / TOKEN_FILE, "spadm_", "an admin token")


def load_or_create_secret(path: Path, prefix: str, what: str) -> str:
    """Read a generated secret, or create it (mode 0600) if no one has yet."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = prefix + secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another worker created it between our read and our create: use theirs.
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    log.warning("generated %s in %s (mode 0600)", what, path.resolve())
    return token


class TokenGuard:
    """Constant-time token comparison, and a per-IP budget of failed attempts."""

    def __init__(self, token: str, *, max_failures: int = 10, window_seconds: float = 60.0):
        self._token = token.encode()
        self._max_failures = max_failures
        self._window = window_seconds
        self._failures: dict[str, tuple[float, int]] = {}

    def blocked(self, ip: str) -> float:
        """Seconds until `ip` may try again (0 = it may try now)."""
        entry = self._failures.get(ip)
        if entry is None:
            return 0.0
        started, count = entry
        remaining = started + self._window - time.monotonic()
        if remaining <= 0:
            del self._failures[ip]
            return 0.0
        return remaining if count >= self._max_failures else 0.0

    def check(self, ip: str, presented: str | None) -> bool:
        ok = presented is not None and hmac.compare_digest(presented.encode(), self._token)
        if not ok:
            now = time.monotonic()
            started, count = self._failures.get(ip, (now, 0))
            if now - started > self._window:
                started, count = now, 0
            self._failures[ip] = (started, count + 1)
            if len(self._failures) > 10_000:  # bound memory under a spray of addresses
                self._failures.pop(next(iter(self._failures)))
        return ok


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, if that is what was sent."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
