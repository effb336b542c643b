"""`shieldproxy keys|tenants|plans|audit`: admin API calls with readable tables or raw JSON.

Exit codes: 0 ok, 1 the API refused (`shieldproxy: <code>: <message>`), 2 bad usage,
3 the admin API cannot be reached. Secrets are printed only when created or rotated.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from shieldproxy.admin_client import AdminClient, AdminError, AdminUnreachable

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


def _meta_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--meta", multiple=True, type=META, metavar="KEY=VALUE", help=help_text)


def _limit_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
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


def _fields(pairs: Iterable[tuple[str, Any]]) -> str:
    return format_table(("FIELD", "VALUE"), pairs).split("\n", 1)[1]


def _meta_text(meta: dict[str, Any] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (meta or {}).items()) or "-"


def _key_fields(key: dict[str, Any]) -> list[tuple[str, Any]]:
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


def _tenant_fields(tenant: dict[str, Any]) -> list[tuple[str, Any]]:
    return [
        ("id", tenant["id"]),
        ("name", tenant["name"]),
        ("plan", tenant["plan"]),
        ("anchor day", tenant.get("anchor_day")),
        ("metadata", _meta_text(tenant.get("metadata"))),
        ("created", format_time(tenant.get("created_at"))),
        ("updated", format_time(tenant.get("updated_at"))),
    ]


# --- connection and error handling shared by every command ----------------------------------


def _die(message: str, code: int) -> NoReturn:
    click.echo(f"shieldproxy: {message}", err=True)
    sys.exit(code)  # not ctx.exit: main() runs click with standalone_mode=False


@dataclass
class Session:
    url: str
    token: str | None
    data_dir: Path
    as_json: bool

    @functools.cached_property
    def client(self) -> AdminClient:
        return AdminClient(self.url, self.token or self._token_from_file())

    def _token_from_file(self) -> str:
        path = self.data_dir / "admin-token"
        try:
            token = path.read_text().strip()
        except OSError as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror
            token, problem = "", f"cannot read {path} ({reason})"
        else:
            problem = f"{path} is empty"
        if not token:
            _die(
                f"no admin token: {problem}; pass --admin-token, set SHIELDPROXY_ADMIN_TOKEN, "
                "or point --data-dir at the server's data dir",
                2,
            )
        return token

    def emit(self, document: Any, human: Callable[[], str]) -> None:
        text = json.dumps(document, indent=2) if self.as_json else human()
        click.echo(text)


def _connection_options() -> list[click.Parameter]:
    return [
        click.Option(
            ["--admin-url"],
            envvar="SHIELDPROXY_ADMIN_URL",
            type=ADMIN_URL,
            default=DEFAULT_ADMIN_URL,
            show_default=True,
            metavar="URL",
            help="Admin API base URL [env SHIELDPROXY_ADMIN_URL].",
        ),
        click.Option(
            ["--admin-token"],
            envvar="SHIELDPROXY_ADMIN_TOKEN",
            metavar="TOKEN",
            help="Admin token [env SHIELDPROXY_ADMIN_TOKEN; default: <data-dir>/admin-token].",
        ),
        click.Option(
            ["--data-dir"],
            envvar="SHIELDPROXY_SERVER__DATA_DIR",
            default=DEFAULT_DATA_DIR,
            show_default=True,
            type=click.Path(file_okay=False),
            help="The local server's data dir, where its admin-token file is.",
        ),
        click.Option(["--json", "as_json"], is_flag=True, help="Print the API's JSON as is."),
    ]


def admin_command(group: click.Group | None, name: str) -> Callable[..., Any]:
    """`@admin_command(keys, "show")` adds the connection flags, passes a Session, maps errors."""

    def decorate(func: Callable[..., None]) -> click.Command:
        @functools.wraps(func)
        def run(
            admin_url: str, admin_token: str | None, data_dir: str, as_json: bool, **kwargs: Any
        ) -> None:
            session = Session(admin_url, admin_token or None, Path(data_dir), as_json)
            try:
                func(session, **kwargs)
            except AdminError as exc:
                _die(f"{exc.code}: {exc.message}", 1)
            except AdminUnreachable as exc:
                _die(f"cannot reach the admin API at {exc.url}: {exc.reason}", 3)

        command = (group.command if group else click.command)(name)(run)
        command.params += _connection_options()  # after the command's own options in --help
        return command

    return decorate


def _collect(session: Session, path: str, query: dict[str, Any], every: bool, cursor: str) -> Any:
    """One page as the API sent it, or with `every` all pages' items merged into one list."""
    page = session.client.get(path, query=query)
    if not every:
        return page
    items, seen = list(page["items"]), set()
    # Stop on a repeated cursor or an empty page too: a log's cursor may always point at its tail.
    while page["items"] and page.get("next_cursor") and page["next_cursor"] not in seen:
        seen.add(page["next_cursor"])
        page = session.client.get(path, query={**query, cursor: page["next_cursor"]})
        items += page["items"]
    return items


def _print_page(
    session: Session, result: Any, table: Callable[[list[dict[str, Any]]], str], flag: str
) -> None:
    items = result if isinstance(result, list) else result["items"]
    session.emit(result, lambda: table(items) if items else "(none)")
    next_cursor = None if isinstance(result, list) else result.get("next_cursor")
    if next_cursor and not session.as_json:
        click.echo(f"more: {flag} {next_cursor} (or --all)", err=True)


def _confirm(what: str, yes: bool) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{what}: no terminal to confirm on; pass --yes")
    if not click.confirm(f"{what}?", default=False):
        _die("cancelled", 1)


_list_options = [
    click.option("--limit", "page_size", type=click.IntRange(1, 200), help="Items per page."),
    click.option("--cursor", help="Continue from a previous page's next_cursor."),
    click.option("--all", "every", is_flag=True, help="Follow next_cursor through every page."),
]


def _with(options: Sequence[Callable[..., Any]]) -> Callable[[Callable[..., Any]], Any]:
    def decorate(func: Callable[..., Any]) -> Any:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


# --- keys ------------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Create, list, change, rotate and revoke API keys."""


def _keys_table(items: list[dict[str, Any]]) -> str:
    headers = ("ID", "NAME", "TENANT", "STATUS", "PREFIX", "SCOPES", "EXPIRES", "LAST USED")
    rows = [
        (
            k["id"], k["name"], k.get("tenant_id"), k["status"], f"{k['prefix']}...{k['last4']}",
            ",".join(k.get("scopes") or []), format_time(k.get("expires_at")),
            format_time(k.get("last_used_at")),
        )
        for k in items
    ]  # fmt: skip
    return format_table(headers, rows)


def _show_secret(session: Session, key: dict[str, Any], verb: str) -> None:
    def human() -> str:
        return (
            f"{verb} key {key['id']}\n{_fields(_key_fields(key))}\n\n"
            f"secret: {key['key']}\n\n"
            "This secret is shown only now and cannot be recovered: store it safely."
        )

    session.emit(key, human)


@admin_command(keys, "create")
@click.option("--name", required=True, help="A label for the key.")
@click.option("--tenant", "tenant_id", metavar="ID", help="Tenant the key belongs to.")
@click.option("--scope", "scopes", multiple=True, type=SCOPES, help="Repeatable [read].")
@_limit_option("Rate limit, repeatable: token_bucket:10/1s:20 or sliding_window:100/60s.")
@click.option("--quota", type=click.IntRange(1), metavar="N", help="Monthly request quota.")
@click.option("--expires-in", type=DURATION, metavar="DURATION", help="e.g. 30d, 2h, 3600s.")
@click.option("--expires-at", type=TIMESTAMP, metavar="ISO8601", help="e.g. 2025-12-31T00:00:00Z")
@_meta_option("Metadata, repeatable.")
def keys_create(
    session: Session,
    *,
    name: str,
    tenant_id: str | None,
    scopes: tuple[str, ...],
    limits: tuple[dict[str, Any], ...],
    quota: int | None,
    expires_in: float | None,
    expires_at: float | None,
    meta: tuple[tuple[str, str], ...],
) -> None:
    """Create a key and print its secret (the only time it is shown)."""
    if expires_in is not None and expires_at is not None:
        raise click.UsageError("give --expires-in or --expires-at, not both")
    body: dict[str, Any] = {"name": name, "metadata": dict(meta)}
    if tenant_id:
        body["tenant_id"] = tenant_id
    if scopes:
        body["scopes"] = list(dict.fromkeys(scopes))
    if limits:
        body["rate_limits"] = list(limits)
    if quota is not None:
        body["quota"] = {"monthly_requests": quota}
    if expires_in is not None:
        body["expires_in_seconds"] = max(1, round(expires_in))
    if expires_at is not None:
        body["expires_at"] = expires_at
    _show_secret(session, session.client.post("/v1/keys", body), "created")


@admin_command(keys, "list")
@click.option("--tenant", "tenant_id", metavar="ID", help="Only this tenant's keys.")
@click.option("--status", type=click.Choice(["active", "revoked", "expired"]))
@_with(_list_options)
def keys_list(
    session: Session,
    *,
    tenant_id: str | None,
    status: str | None,
    page_size: int | None,
    cursor: str | None,
    every: bool,
) -> None:
    """List keys (one page unless --all)."""
    query = {"tenant_id": tenant_id, "status": status, "limit": page_size, "cursor": cursor}
    result = _collect(session, "/v1/keys", query, every, "cursor")
    _print_page(session, result, _keys_table, "--cursor")


def _key_path(key_id: str, suffix: str = "") -> str:
    return f"/v1/keys/{_quote(key_id)}{suffix}"


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


@admin_command(keys, "show")
@click.argument("key_id", metavar="ID")
def keys_show(session: Session, key_id: str) -> None:
    """Show one key (never its secret)."""
    key = session.client.get(_key_path(key_id))
    session.emit(key, lambda: _fields(_key_fields(key)))


@admin_command(keys, "usage")
@click.argument("key_id", metavar="ID")
def keys_usage(session: Session, key_id: str) -> None:
    """Show a key's remaining rate limits and quota."""
    usage = session.client.get(_key_path(key_id, "/usage"))

    def human() -> str:
        rows = [
            (u["name"], u["strategy"], u["limit"], u["remaining"], f"{u['reset_seconds']:g}s")
            for u in usage.get("limits") or []
        ]
        table = format_table(("LIMIT", "STRATEGY", "MAX", "REMAINING", "RESETS IN"), rows)
        quota = usage.get("quota_limit")
        used = f"{usage.get('quota_used')}/{quota}" if quota else "no quota"
        period = f"{format_time(usage.get('quota_period_start'))} .. "
        period += format_time(usage.get("quota_period_end"))
        return f"{table}\n\nquota: {used} ({period})"

    session.emit(usage, human)


@admin_command(keys, "update")
@click.argument("key_id", metavar="ID")
@click.option("--name", help="New label.")
@click.option("--scope", "scopes", multiple=True, type=SCOPES, help="Replaces all scopes.")
@_limit_option("Replaces all rate limits, repeatable.")
@click.option("--no-limits", is_flag=True, help="Remove every rate limit of the key.")
@click.option("--quota", type=click.IntRange(1), metavar="N", help="Monthly request quota.")
@click.option("--no-quota", is_flag=True, help="Remove the key's quota.")
@click.option("--expires-at", type=TIMESTAMP, metavar="ISO8601", help="New expiry time.")
@click.option("--expires-in", type=DURATION, metavar="DURATION", help="New expiry, from now.")
@click.option("--no-expiry", is_flag=True, help="The key never expires.")
@_meta_option("Replaces all metadata, repeatable.")
def keys_update(
    session: Session,
    *,
    key_id: str,
    name: str | None,
    scopes: tuple[str, ...],
    limits: tuple[dict[str, Any], ...],
    no_limits: bool,
    quota: int | None,
    no_quota: bool,
    expires_at: float | None,
    expires_in: float | None,
    no_expiry: bool,
    meta: tuple[tuple[str, str], ...],
) -> None:
    """Change a key; only the options given change."""
    _exclusive(("--limit", bool(limits)), ("--no-limits", no_limits))
    _exclusive(("--quota", quota is not None), ("--no-quota", no_quota))
    _exclusive(
        ("--expires-at", expires_at is not None),
        ("--expires-in", expires_in is not None),
        ("--no-expiry", no_expiry),
    )
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if scopes:
        body["scopes"] = list(dict.fromkeys(scopes))
    if limits or no_limits:
        body["rate_limits"] = list(limits)
    if quota is not None or no_quota:
        body["quota"] = {"monthly_requests": quota} if quota else None
    if expires_in is not None:
        expires_at = dt.datetime.now(dt.UTC).timestamp() + expires_in
    if expires_at is not None or no_expiry:
        body["expires_at"] = expires_at
    if meta:
        body["metadata"] = dict(meta)
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    key = session.client.patch(_key_path(key_id), body)
    session.emit(key, lambda: f"updated key {key['id']}\n{_fields(_key_fields(key))}")


def _exclusive(*flags: tuple[str, bool]) -> None:
    given = [name for name, present in flags if present]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} cannot be used together")


@admin_command(keys, "rotate")
@click.argument("key_id", metavar="ID")
@click.option("--grace", type=DURATION, default="0s", show_default=True, metavar="DURATION",
              help="How long the old secret keeps working, e.g. 1h.")  # fmt: skip
def keys_rotate(session: Session, key_id: str, grace: float) -> None:
    """Issue a new secret for a key; print it (the only time it is shown)."""
    key = session.client.post(_key_path(key_id, "/rotate"), {"grace_seconds": round(grace)})
    _show_secret(session, key, "rotated")


@admin_command(keys, "revoke")
@click.argument("key_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def keys_revoke(session: Session, key_id: str, yes: bool) -> None:
    """Revoke a key: requests with it are refused from now on (401 revoked_key)."""
    _confirm(f"revoke key {key_id}", yes)
    result = session.client.delete(_key_path(key_id))
    session.emit(result, lambda: f"revoked key {key_id}")


# --- tenants and plans ------------------------------------------------------------------------


@click.group()
def tenants() -> None:
    """Create, list, change and delete tenants (a plan shared by several keys)."""


def _tenants_table(items: list[dict[str, Any]]) -> str:
    rows = [
        (t["id"], t["name"], t["plan"], t.get("anchor_day"), format_time(t.get("created_at")))
        for t in items
    ]
    return format_table(("ID", "NAME", "PLAN", "ANCHOR DAY", "CREATED"), rows)


@admin_command(tenants, "create")
@click.option("--name", required=True, help="Tenant name.")
@click.option("--plan", required=True, help="A plan from the config's [plans] (see `plans`).")
@click.option("--anchor-day", type=click.IntRange(1, 28), help="Billing month starts on [1].")
@_meta_option("Metadata, repeatable.")
def tenants_create(
    session: Session,
    name: str,
    plan: str,
    anchor_day: int | None,
    meta: tuple[tuple[str, str], ...],
) -> None:
    """Create a tenant."""
    body: dict[str, Any] = {"name": name, "plan": plan, "metadata": dict(meta)}
    if anchor_day is not None:
        body["anchor_day"] = anchor_day
    tenant = session.client.post("/v1/tenants", body)
    session.emit(
        tenant, lambda: f"created tenant {tenant['id']}\n{_fields(_tenant_fields(tenant))}"
    )


@admin_command(tenants, "list")
@_with(_list_options)
def tenants_list(session: Session, page_size: int | None, cursor: str | None, every: bool) -> None:
    """List tenants (one page unless --all)."""
    query = {"limit": page_size, "cursor": cursor}
    result = _collect(session, "/v1/tenants", query, every, "cursor")
    _print_page(session, result, _tenants_table, "--cursor")


@admin_command(tenants, "show")
@click.argument("tenant_id", metavar="ID")
def tenants_show(session: Session, tenant_id: str) -> None:
    """Show one tenant."""
    tenant = session.client.get(f"/v1/tenants/{_quote(tenant_id)}")
    session.emit(tenant, lambda: _fields(_tenant_fields(tenant)))


@admin_command(tenants, "update")
@click.argument("tenant_id", metavar="ID")
@click.option("--name", help="New name.")
@click.option("--plan", help="New plan.")
@click.option("--anchor-day", type=click.IntRange(1, 28), help="New billing anchor day.")
@_meta_option("Replaces all metadata, repeatable.")
def tenants_update(
    session: Session,
    *,
    tenant_id: str,
    name: str | None,
    plan: str | None,
    anchor_day: int | None,
    meta: tuple[tuple[str, str], ...],
) -> None:
    """Change a tenant; only the options given change."""
    body: dict[str, Any] = {"name": name, "plan": plan, "anchor_day": anchor_day}
    body = {k: v for k, v in body.items() if v is not None}
    if meta:
        body["metadata"] = dict(meta)
    if not body:
        raise click.UsageError("nothing to update: give at least one option")
    tenant = session.client.patch(f"/v1/tenants/{_quote(tenant_id)}", body)
    session.emit(
        tenant, lambda: f"updated tenant {tenant['id']}\n{_fields(_tenant_fields(tenant))}"
    )


@admin_command(tenants, "delete")
@click.argument("tenant_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def tenants_delete(session: Session, tenant_id: str, yes: bool) -> None:
    """Delete a tenant."""
    _confirm(f"delete tenant {tenant_id}", yes)
    result = session.client.delete(f"/v1/tenants/{_quote(tenant_id)}")
    session.emit(result, lambda: f"deleted tenant {tenant_id}")


@admin_command(None, "plans")
def plans(session: Session) -> None:
    """List the plans tenants can be on (configured in [plans])."""
    result = session.client.get("/v1/plans")
    items = result["items"] if isinstance(result, dict) else result

    def human() -> str:
        rows = [
            (
                p["name"], p.get("monthly_quota") or "-", p.get("overage"),
                p.get("price_monthly_cents"),
                " ".join(f"{lim['name']}={format_limit(lim)}" for lim in p.get("limits") or []),
            )
            for p in items
        ]  # fmt: skip
        return format_table(("PLAN", "QUOTA", "OVERAGE", "PRICE CENTS", "LIMITS"), rows)

    session.emit(result, lambda: human() if items else "(none)")


# --- audit -----------------------------------------------------------------------------------


def _audit_table(items: list[dict[str, Any]]) -> str:
    rows = [(format_time(e["at"]), e["action"], e["target"], e["actor"], e["ip"]) for e in items]
    return format_table(("AT", "ACTION", "TARGET", "ACTOR", "IP"), rows)


@admin_command(None, "audit")
@click.option("--since", metavar="CURSOR", help="Continue after a previous page's next_cursor.")
@click.option("--limit", "page_size", type=click.IntRange(1, 200), help="Entries per page.")
@click.option("--action", help="Only this action, e.g. key.create.")
@click.option("--target", metavar="ID", help="Only changes to this id.")
@click.option("--actor", help="Only changes by this admin token id.")
@click.option("--all", "every", is_flag=True, help="Follow next_cursor through every page.")
def audit(
    session: Session,
    *,
    since: str | None,
    page_size: int | None,
    action: str | None,
    target: str | None,
    actor: str | None,
    every: bool,
) -> None:
    """Show the audit log of admin changes."""
    query = {"since": since, "limit": page_size, "action": action, "target": target}
    query["actor"] = actor
    result = _collect(session, "/v1/audit", query, every, "since")
    _print_page(session, result, _audit_table, "--since")


COMMANDS: tuple[click.Command, ...] = (keys, tenants, plans, audit)
