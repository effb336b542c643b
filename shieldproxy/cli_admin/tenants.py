"""`shieldproxy tenants|plans|audit ...`."""

from __future__ import annotations

from typing import Any

import click

from shieldproxy.cli_admin.keys import quote_segment
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
    field_lines,
    format_limit,
    format_table,
    format_time,
    meta_option,
    tenant_fields,
)

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
@meta_option("Metadata, repeatable.")
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
        tenant, lambda: f"created tenant {tenant['id']}\n{field_lines(tenant_fields(tenant))}"
    )


@admin_command(tenants, "list")
@with_options(LIST_OPTIONS)
def tenants_list(session: Session, page_size: int | None, cursor: str | None, every: bool) -> None:
    """List tenants (one page unless --all)."""
    query = {"limit": page_size, "cursor": cursor}
    result = collect_pages(session, "/v1/tenants", query, every, "cursor")
    print_page(session, result, _tenants_table, "--cursor")


@admin_command(tenants, "show")
@click.argument("tenant_id", metavar="ID")
def tenants_show(session: Session, tenant_id: str) -> None:
    """Show one tenant."""
    tenant = session.client.get(f"/v1/tenants/{quote_segment(tenant_id)}")
    session.emit(tenant, lambda: field_lines(tenant_fields(tenant)))


@admin_command(tenants, "update")
@click.argument("tenant_id", metavar="ID")
@click.option("--name", help="New name.")
@click.option("--plan", help="New plan.")
@click.option("--anchor-day", type=click.IntRange(1, 28), help="New billing anchor day.")
@meta_option("Replaces all metadata, repeatable.")
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
    tenant = session.client.patch(f"/v1/tenants/{quote_segment(tenant_id)}", body)
    session.emit(
        tenant, lambda: f"updated tenant {tenant['id']}\n{field_lines(tenant_fields(tenant))}"
    )


@admin_command(tenants, "delete")
@click.argument("tenant_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def tenants_delete(session: Session, tenant_id: str, yes: bool) -> None:
    """Delete a tenant."""
    confirm_or_stop(f"delete tenant {tenant_id}", yes)
    result = session.client.delete(f"/v1/tenants/{quote_segment(tenant_id)}")
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
    result = collect_pages(session, "/v1/audit", query, every, "since")
    print_page(session, result, _audit_table, "--since")
