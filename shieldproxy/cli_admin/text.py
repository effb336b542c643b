"""Flag values in (durations, limits, times, metadata), readable tables out."""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

DEFAULT_ADMIN_URL = "http://127.0.0.1:8081"
DEFAULT_DATA_DIR = ".shieldproxy"
STRATEGIES = ("fixed_window", "sliding_window", "sliding_log", "token_bucket", "concurrency")
SCOPES = click.Choice(["read", "write", "admin"])
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_LIMIT = re.compile(
    r"(?:(?P<strategy>[a-z_]+):)?(?P<requests>\d+)/(?P<window>[^:]+)(?::(?P<burst>\d+))?"
)


# --- parsing: flag values → API values (bad syntax is a UsageError: one line, exit 2) ---------


def parse_duration(text: str) -> float:
    """`"90"`, `"90s"`, `"15m"`, `"2h"`, `"30d"`, `"1w"`, `"1.5h"` → seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (use e.g. 3600s, 15m, 2h, 30d)")
    return float(match[1]) * _UNITS[match[2] or "s"]


def parse_limit(text: str) -> dict[str, Any]:
    """`token_bucket:10/1s:20` → `{"strategy", "requests", "window_seconds", "burst"}`."""
    match = _LIMIT.fullmatch(text.strip())
    if not match:
        raise ValueError(
            f"{text!r} is not a limit (use STRATEGY:REQUESTS/WINDOW[:BURST], "
            "e.g. token_bucket:10/1s:20 or sliding_window:100/60s)"
        )
    strategy = match["strategy"] or "sliding_window"
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)})")
    try:
        window = parse_duration(match["window"])
    except ValueError as exc:
        raise ValueError(f"{text!r}: window {exc}") from None
    requests = int(match["requests"])
    if requests <= 0 or window <= 0:
        raise ValueError(f"{text!r}: requests and window must be > 0")
    limit: dict[str, Any] = {"strategy": strategy, "requests": requests, "window_seconds": window}
    if match["burst"] is not None:
        if strategy != "token_bucket":
            raise ValueError(f"{text!r}: a burst is only meaningful with token_bucket")
        limit["burst"] = int(match["burst"])
    return limit


def parse_timestamp(text: str) -> float:
    """ISO-8601 (`2025-01-31`, `2025-01-31T12:00:00Z`, with offset) → epoch seconds; naive = UTC."""
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time (e.g. 2025-01-31T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def parse_meta(text: str) -> tuple[str, str]:
    """`team=core` → `("team", "core")`; values stay strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    return key, value


def parse_admin_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL with a host")
    return text.strip().rstrip("/")


class _Parsed(click.ParamType[Any]):
    """A click type over one of the parse_* functions: ValueError becomes BadParameter."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = _Parsed("duration", parse_duration)
LIMIT = _Parsed("limit", parse_limit)
TIMESTAMP = _Parsed("time", parse_timestamp)
META = _Parsed("meta", parse_meta)
ADMIN_URL = _Parsed("url", parse_admin_url)


def meta_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--meta", multiple=True, type=META, metavar="KEY=VALUE", help=help_text)


def limit_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    metavar = "STRATEGY:N/WINDOW[:BURST]"
    return click.option(
        "--limit", "limits", multiple=True, type=LIMIT, metavar=metavar, help=help_text
    )


# --- formatting ------------------------------------------------------------------------------


def format_time(value: float | None) -> str:
    if value is None:
        return "-"
    moment = dt.datetime.fromtimestamp(value, dt.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def format_duration(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"


def format_limit(limit: dict[str, Any]) -> str:
    """The inverse of parse_limit, so `show` output can be pasted back into `--limit`."""
    text = f"{limit['strategy']}:{limit['requests']}/{format_duration(limit['window_seconds'])}"
    return text + (f":{limit['burst']}" if limit.get("burst") else "")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Plain left-aligned columns, two spaces apart; `None` shows as `-`."""
    cells = [[str(h) for h in headers]]
    cells += [["-" if c is None or c == "" else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def field_lines(pairs: Iterable[tuple[str, Any]]) -> str:
    return format_table(("FIELD", "VALUE"), pairs).split("\n", 1)[1]


def _meta_text(meta: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (meta or {}).items()) or "-"


def key_fields(key: dict[str, Any]) -> list[tuple[str, Any]]:
    quota = key.get("quota")
    return [
        ("id", key["id"]),
        ("name", key["name"]),
        ("tenant", key.get("tenant_id")),
        ("status", key["status"]),
        ("prefix", f"{key['prefix']}...{key['last4']}"),
        ("scopes", ",".join(key.get("scopes") or [])),
        ("limits", " ".join(format_limit(lim) for lim in key.get("rate_limits") or [])),
        ("quota", f"{quota['monthly_requests']}/month" if quota else None),
        ("expires", format_time(key.get("expires_at"))),
        ("metadata", _meta_text(key.get("metadata"))),
        ("created", format_time(key.get("created_at"))),
        ("updated", format_time(key.get("updated_at"))),
        ("last used", format_time(key.get("last_used_at"))),
        ("rotated", format_time(key.get("rotated_at"))),
        ("old secret until", format_time(key.get("previous_valid_until"))),
    ]


def tenant_fields(tenant: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", tenant["id"]),
        ("name", tenant["name"]),
        ("plan", tenant["plan"]),
        ("anchor day", tenant.get("anchor_day")),
        ("metadata", _meta_text(tenant.get("metadata"))),
        ("created", format_time(tenant.get("created_at"))),
        ("updated", format_time(tenant.get("updated_at"))),
    ]
