"""The admin API's /v1 endpoints: one route table registers the routes and generates their docs."""

from __future__ import annotations

import base64
import importlib.metadata
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from shieldproxy.admin import models as m
from shieldproxy.admin.audit import actor_id
from shieldproxy.admin.auth import bearer_token
from shieldproxy.admin.openapi import Route, build_document
from shieldproxy.keys.usage import key_usage
from shieldproxy.state import ProxyState

M = TypeVar("M", bound=BaseModel)
_LOCAL_EVENT_ID = re.compile(r"[0-9]{1,18}")


class ApiError(Exception):
    """The request as sent cannot be served; `json_errors` renders it as the error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class Call:
    """What a handler gets: the request, the shared state and its validated inputs."""

    request: web.Request
    state: ProxyState
    body: BaseModel | None
    query: BaseModel | None

    @property
    def id(self) -> str:
        return self.request.match_info["id"]

    def body_as(self, model: type[M]) -> M:
        assert isinstance(self.body, model), "route table and handler disagree on the body"
        return self.body

    def query_as(self, model: type[M]) -> M:
        assert isinstance(self.query, model), "route table and handler disagree on the query"
        return self.query

    async def audit(
        self, action: str, target: str, before: dict[str, Any] | None, after: dict[str, Any] | None
    ) -> None:
        await self.state.audit.record(
            actor=actor_id(bearer_token(self.request) or ""),
            ip=self.request.remote or "",
            action=action,
            target=target,
            before=before,
            after=after,
        )


# ---- tenants and plans ------------------------------------------------------------------


async def create_tenant(call: Call) -> dict[str, Any]:
    tenant = await call.state.registry.create_tenant(call.body_as(m.TenantCreate).model_dump())
    await call.audit("tenant.create", tenant["id"], None, tenant)
    return tenant


async def list_tenants(call: Call) -> dict[str, Any]:
    query = call.query_as(m.PageQuery)
    return _page(await call.state.registry.list_tenants(), query.limit, query.cursor)


async def get_tenant(call: Call) -> dict[str, Any]:
    return await call.state.registry.get_tenant(call.id)


async def update_tenant(call: Call) -> dict[str, Any]:
    changes = _changes(call.body_as(m.TenantUpdate), cleared={"metadata": {}})
    before = await call.state.registry.get_tenant(call.id)
    after = await call.state.registry.update_tenant(call.id, changes)
    await call.audit("tenant.update", call.id, before, after)
    return after


async def delete_tenant(call: Call) -> dict[str, Any]:
    before = await call.state.registry.delete_tenant(call.id)
    await call.audit("tenant.delete", call.id, before, None)
    return before


async def list_plans(call: Call) -> list[m.Plan]:
    plans = call.state.runtime.config.plans  # read per call: a reload swaps the runtime
    return [
        m.Plan(
            name=name,
            limits=[
                m.PlanLimit(
                    name=limit.name,
                    scope=limit.scope,
                    strategy=limit.strategy,
                    requests=limit.requests,
                    window_seconds=limit.window_seconds,
                    burst=limit.burst,
                )
                for limit in plan.limits
            ],
            monthly_quota=plan.monthly_quota,
            overage=plan.overage,
            price_monthly_cents=plan.price_monthly_cents,
            price_per_1k_overage_cents=plan.price_per_1k_overage_cents,
        )
        for name, plan in sorted(plans.items())
    ]


# ---- keys -------------------------------------------------------------------------------


async def create_key(call: Call) -> dict[str, Any]:
    body = call.body_as(m.KeyCreate)
    expires_at = body.expires_at
    if body.expires_in_seconds is not None:
        expires_at = time.time() + body.expires_in_seconds
    fields = {
        "name": body.name,
        "tenant_id": body.tenant_id or None,
        "scopes": list(dict.fromkeys(body.scopes)),
        "rate_limits": [limit.model_dump() for limit in body.limits()],
        "quota": body.quota.model_dump() if body.quota else None,
        "expires_at": expires_at,
        "metadata": body.metadata,
    }
    key, secret = await call.state.registry.create_key(fields)
    await call.audit("key.create", key["id"], None, key)
    return {**key, "key": secret}


async def list_keys(call: Call) -> dict[str, Any]:
    query = call.query_as(m.KeyQuery)
    keys = await call.state.registry.list_keys(tenant_id=query.tenant_id, status=query.status)
    return _page(keys, query.limit, query.cursor)


async def get_key(call: Call) -> dict[str, Any]:
    return await call.state.registry.get_key(call.id)


async def update_key(call: Call) -> dict[str, Any]:
    body = call.body_as(m.KeyUpdate)
    changes = _changes(
        body, cleared={"rate_limits": [], "quota": None, "expires_at": None, "metadata": {}}
    )
    if "scopes" in changes:
        changes["scopes"] = list(dict.fromkeys(changes["scopes"]))
    before = await call.state.registry.get_key(call.id)
    after = await call.state.registry.update_key(call.id, changes)
    await call.audit("key.update", call.id, before, after)
    return after


async def revoke_key(call: Call) -> dict[str, Any]:
    before = await call.state.registry.get_key(call.id)
    after = await call.state.registry.revoke_key(call.id)
    await call.audit("key.revoke", call.id, before, after)
    return after


async def rotate_key(call: Call) -> dict[str, Any]:
    grace = call.body_as(m.KeyRotate).grace_seconds
    before = await call.state.registry.get_key(call.id)
    after, secret = await call.state.registry.rotate_key(call.id, grace)
    await call.audit("key.rotate", call.id, before, after)  # the secret only in the reply
    return {**after, "key": secret}


async def get_key_usage(call: Call) -> dict[str, Any]:
    return await key_usage(call.state, call.id)


async def list_audit(call: Call) -> dict[str, Any]:
    query = call.query_as(m.AuditQuery)
    if (
        query.since
        and call.state.runtime.config.store.url == "local"
        and not _LOCAL_EVENT_ID.fullmatch(query.since)
    ):
        # The local store numbers events 1, 2, ...; only Redis stream ids carry a "-seq".
        raise ApiError(422, "invalid", "since: not a cursor this API issued")
    items, cursor = await call.state.audit.entries(
        since=query.since,
        limit=query.limit,
        action=query.action,
        target=query.target,
        actor=query.actor,
    )
    return {"items": items, "next_cursor": cursor}


ROUTES = (
    Route("POST", "/v1/tenants", create_tenant, "Create a tenant", m.Tenant, 201, m.TenantCreate),
    Route("GET", "/v1/tenants", list_tenants, "List tenants", m.TenantPage, query=m.PageQuery),
    Route("GET", "/v1/tenants/{id}", get_tenant, "Show a tenant", m.Tenant),
    Route("PATCH", "/v1/tenants/{id}", update_tenant, "Change a tenant", m.Tenant,
          body=m.TenantUpdate),
    Route("DELETE", "/v1/tenants/{id}", delete_tenant, "Delete a tenant without active keys",
          m.Tenant, errors=(409,)),
    Route("GET", "/v1/plans", list_plans, "List the configured plans", list[m.Plan]),
    Route("POST", "/v1/keys", create_key, "Create a key (the secret is shown only here)",
          m.KeyWithSecret, 201, m.KeyCreate),
    Route("GET", "/v1/keys", list_keys, "List keys", m.KeyPage, query=m.KeyQuery),
    Route("GET", "/v1/keys/{id}", get_key, "Show a key", m.Key),
    Route("PATCH", "/v1/keys/{id}", update_key, "Change a key (only the fields given)", m.Key,
          body=m.KeyUpdate, errors=(409,)),
    Route("DELETE", "/v1/keys/{id}", revoke_key, "Revoke a key", m.Key),
    Route("POST", "/v1/keys/{id}/rotate", rotate_key, "New secret; the old one works for the grace",
          m.KeyWithSecret, body=m.KeyRotate, body_required=False, errors=(409,)),
    Route("GET", "/v1/keys/{id}/usage", get_key_usage, "Limits and quota use of a key", m.KeyUsage),
    Route("GET", "/v1/audit", list_audit, "Admin changes, oldest first", m.AuditPage,
          query=m.AuditQuery),
)  # fmt: skip


def register(app: web.Application, state: ProxyState) -> None:
    """Serve every route of the table, and /openapi.json describing exactly those."""
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _endpoint(route, state))
    document = orjson.dumps(
        build_document(
            ROUTES,
            title="shieldproxy admin API",
            version=importlib.metadata.version("shieldproxy"),
        )
    )

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)


def _endpoint(route: Route, state: ProxyState) -> Callable[[web.Request], Awaitable[web.Response]]:
    adapter: TypeAdapter[Any] = TypeAdapter(route.response)

    async def handle(request: web.Request) -> web.Response:
        query = None
        if route.query is not None:
            given = {name: request.query[name] for name in request.query}  # first value wins
            query = _validate(route.query, given)
        body = None
        if route.body is not None:
            body = _validate(route.body, await _json_object(request))
        result = await route.handler(Call(request, state, body, query))
        # Validating the reply against the documented model also drops any internal field.
        payload = adapter.dump_json(adapter.validate_python(result))
        return web.Response(body=payload, status=route.status, content_type="application/json")

    return handle


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}  # e.g. a rotate without a body: every field takes its default
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return doc


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid", _problems(exc)) from None


def _problems(exc: ValidationError) -> str:
    """`rate_limits[0].requests: Input should be greater than 0; name: unknown field`."""
    lines = []
    for error in exc.errors(include_url=False):
        path = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"]
        )
        if error["type"] == "extra_forbidden":
            problem = "unknown field"
        elif error["type"] == "missing":
            problem = "required"
        else:
            problem = error["msg"].removeprefix("Value error, ")
        lines.append(f"{path.lstrip('.')}: {problem}" if path else problem)
    return "; ".join(lines)


def _changes(update: BaseModel, cleared: dict[str, Any]) -> dict[str, Any]:
    """The fields a PATCH body names; `null` clears those in `cleared`, others need a value."""
    changes = update.model_dump(exclude_unset=True)
    for name, value in changes.items():
        if value is None:
            if name not in cleared:
                raise ApiError(422, "invalid", f"{name}: cannot be null")
            changes[name] = cleared[name]
    return changes


def _page(items: list[dict[str, Any]], limit: int, cursor: str | None) -> dict[str, Any]:
    """Keyset pagination over items sorted by (created_at, id): stable under inserts."""
    if cursor:
        after = _decode_cursor(cursor)
        items = [item for item in items if (item["created_at"], item["id"]) > after]
    page = items[:limit]
    more = len(items) > limit
    return {"items": page, "next_cursor": _encode_cursor(page[-1]) if more else None}


def _encode_cursor(item: dict[str, Any]) -> str:
    raw = f"{item['created_at']!r}|{item['id']}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, item_id = raw.partition("|")
        return float(created_at), item_id
    except ValueError:  # bad base64, bad UTF-8, bad number: all ValueError subclasses
        raise ApiError(422, "invalid", "cursor: not a cursor this API issued") from None
