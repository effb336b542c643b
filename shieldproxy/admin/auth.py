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
    """Read a generated secret, or create it (mode 0600) if no one has yet.

    Workers start together and race here. The secret is written whole to a private temporary
    file, then published by a hard link, which fails if the name exists: a reader finds
    either no file or a complete one, never the empty file that an exclusive create shows
    between its open and its write (a worker once read that and started with no secret).
    """
    existing = _read_secret(path)
    if existing is not None:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    token = prefix + secrets.token_urlsafe(32)
    draft = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(token + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(draft, path)
        except FileExistsError:
            # Another worker published first: use theirs.
            theirs = _read_secret(path)
            if theirs is None:
                raise ValueError(f"{path} vanished while it was being created") from None
            return theirs
    finally:
        draft.unlink(missing_ok=True)
    log.warning("generated %s in %s (mode 0600)", what, path.resolve())
    return token


def _read_secret(path: Path) -> str | None:
    """The secret in `path`, or None if there is no file. An empty file is refused rather
    than replaced: it may be a damaged copy of a secret that live keys depend on."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        raise ValueError(f"{path} is empty: restore it, or delete it to generate a new one")
    return text


class TokenGuard:
    """Constant-time token comparison, and a per-IP budget of failed attempts."""

    def __init__(self, token: str, *, max_failures: int = 10, window_seconds: float = 60.0):
        if not token:
            # An empty token would match an empty `Bearer ` header: never serve with one.
            raise ValueError("the admin token is empty")
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
