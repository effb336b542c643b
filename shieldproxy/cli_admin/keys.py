"""`shieldproxy keys ...`: create, list, show, usage, update, rotate, revoke."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

import click

from shieldproxy.cli_admin.session import (
    LIST_OPTIONS,
    Session,
    admin_command,
    collect_pages,
    confirm_or_stop,
    print_page,
    with_options,
)
from shieldproxy.cli_admin.text import (
    DURATION,
    SCOPES,
    TIMESTAMP,
    field_lines,
    format_table,
    format_time,
    key_fields,
    limit_option,
    meta_option,
)

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
            f"{verb} key {key['id']}\n{field_lines(key_fields(key))}\n\n"
            f"secret: {key['key']}\n\n"
            "This secret is shown only now and cannot be recovered: store it safely."
        )

    session.emit(key, human)


@admin_command(keys, "create")
@click.option("--name", required=True, help="A label for the key.")
@click.option("--tenant", "tenant_id", metavar="ID", help="Tenant the key belongs to.")
@click.option("--scope", "scopes", multiple=True, type=SCOPES, help="Repeatable [read].")
@limit_option("Rate limit, repeatable: token_bucket:10/1s:20 or sliding_window:100/60s.")
@click.option("--quota", type=click.IntRange(1), metavar="N", help="Monthly request quota.")
@click.option("--expires-in", type=DURATION, metavar="DURATION", help="e.g. 30d, 2h, 3600s.")
@click.option("--expires-at", type=TIMESTAMP, metavar="ISO8601", help="e.g. 2025-12-31T00:00:00Z")
@meta_option("Metadata, repeatable.")
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
@with_options(LIST_OPTIONS)
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
    result = collect_pages(session, "/v1/keys", query, every, "cursor")
    print_page(session, result, _keys_table, "--cursor")


def _key_path(key_id: str, suffix: str = "") -> str:
    return f"/v1/keys/{quote_segment(key_id)}{suffix}"


def quote_segment(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


@admin_command(keys, "show")
@click.argument("key_id", metavar="ID")
def keys_show(session: Session, key_id: str) -> None:
    """Show one key (never its secret)."""
    key = session.client.get(_key_path(key_id))
    session.emit(key, lambda: field_lines(key_fields(key)))


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
@limit_option("Replaces all rate limits, repeatable.")
@click.option("--no-limits", is_flag=True, help="Remove every rate limit of the key.")
@click.option("--quota", type=click.IntRange(1), metavar="N", help="Monthly request quota.")
@click.option("--no-quota", is_flag=True, help="Remove the key's quota.")
@click.option("--expires-at", type=TIMESTAMP, metavar="ISO8601", help="New expiry time.")
@click.option("--expires-in", type=DURATION, metavar="DURATION", help="New expiry, from now.")
@click.option("--no-expiry", is_flag=True, help="The key never expires.")
@meta_option("Replaces all metadata, repeatable.")
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
    session.emit(key, lambda: f"updated key {key['id']}\n{field_lines(key_fields(key))}")


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
    confirm_or_stop(f"revoke key {key_id}", yes)
    result = session.client.delete(_key_path(key_id))
    session.emit(result, lambda: f"revoked key {key_id}")
