"""The admin API against a real `shieldproxy serve`: tenants, keys, audit, errors, OpenAPI, docs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.client import Reply, get, request
from tests.fixtures.processes import Proxy

ProxyFactory = Callable[..., Proxy]

PLANS = """
[plans.free]
monthly_quota = 1000
limits = [{ name = "free-per-tenant", scope = "tenant", strategy = "fixed_window", requests = 100, window_seconds = 60 }]

[plans.pro]
price_monthly_cents = 4900
price_per_1k_overage_cents = 10
overage = "allow"
"""


class Admin:
    """The admin API with the token, speaking JSON."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.token = proxy.admin_token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = None,
    ) -> Reply:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        return request(self.proxy.admin_port, method, path, headers=headers, body=data)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        reply = self.call(method, path, body)
        assert reply.status == status, (reply.status, reply.body)
        assert reply.headers["Content-Type"].startswith("application/json")
        return reply.json()

    def error(
        self, method: str, path: str, body: Any = None, **kwargs: Any
    ) -> tuple[int, str, str]:
        reply = self.call(method, path, body, **kwargs)
        doc = reply.json()
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
        return reply.status, doc["error"]["code"], doc["error"]["message"]


@pytest.fixture
def admin(proxy_factory: ProxyFactory) -> Admin:
    return Admin(proxy_factory(PLANS, auth=True))


def through_proxy(proxy: Proxy, secret: str, path: str = "/echo") -> Reply:
    return get(proxy.port, path, headers={"Authorization": f"Bearer {secret}"})


def upstream_headers(reply: Reply) -> dict[str, str]:
    return {k.lower(): v for k, v in reply.json()["headers"]}


def test_tenant_and_key_lifecycle_through_the_proxy(admin: Admin) -> None:
    tenant = admin.ok("POST", "/v1/tenants", {"name": "Acme", "plan": "free"}, 201)
    assert tenant["id"].startswith("ten_") and tenant["plan"] == "free"
    assert tenant["anchor_day"] == 1 and tenant["metadata"] == {}
    assert admin.ok("GET", f"/v1/tenants/{tenant['id']}") == tenant

    created = admin.ok(
        "POST",
        "/v1/keys",
        {
            "name": "ci",
            "tenant_id": tenant["id"],
            "scopes": ["read", "write"],
            "rate_limit": {"strategy": "fixed_window", "requests": 50, "window_seconds": 60},
            "quota": {"monthly_requests": 500},
            "expires_in_seconds": 3600,
            "metadata": {"team": "build"},
        },
        201,
    )
    secret = created.pop("key")
    assert secret.startswith("sp_live_") and secret.startswith(created["prefix"])
    assert secret.endswith(created["last4"])
    assert created["status"] == "active" and created["scopes"] == ["read", "write"]
    assert created["rate_limits"] == [
        {"strategy": "fixed_window", "requests": 50, "window_seconds": 60.0, "burst": None}
    ]
    assert time.time() + 3500 < created["expires_at"] < time.time() + 3700

    shown = admin.ok("GET", f"/v1/keys/{created['id']}")
    assert "key" not in shown and secret not in json.dumps(shown)
    assert {k: v for k, v in shown.items() if k != "last_used_at"} == {
        k: v for k, v in created.items() if k != "last_used_at"
    }

    reply = through_proxy(admin.proxy, secret)
    assert reply.status == 200, reply.body
    seen = upstream_headers(reply)
    assert seen["x-shield-key-id"] == created["id"]
    assert seen["x-shield-tenant-id"] == tenant["id"]
    assert seen["x-shield-scopes"] == "read,write"

    usage = admin.ok("GET", f"/v1/keys/{created['id']}/usage")
    assert usage["key_id"] == created["id"] and usage["quota_limit"] == 500

    revoked = admin.ok("DELETE", f"/v1/keys/{created['id']}")
    assert revoked["status"] == "revoked"
    denied = through_proxy(admin.proxy, secret)
    assert denied.status == 401 and denied.json()["error"]["code"] == "revoked_key"

    gone = admin.ok("DELETE", f"/v1/tenants/{tenant['id']}")
    assert gone["id"] == tenant["id"]
    assert admin.error("GET", f"/v1/tenants/{tenant['id']}")[:2] == (404, "not_found")


def test_the_key_itself_is_not_forwarded(admin: Admin) -> None:
    """DESIGN §5: the upstream learns the key's id, never its secret (in either header)."""
    secret = admin.ok("POST", "/v1/keys", {"name": "k"}, 201)["key"]
    for headers in ({"Authorization": f"Bearer {secret}"}, {"X-API-Key": secret}):
        reply = get(admin.proxy.port, "/echo", headers=headers)
        assert reply.status == 200, reply.body
        assert secret not in reply.body.decode()


def test_rotate_keeps_the_old_secret_for_the_grace_period_only(admin: Admin) -> None:
    created = admin.ok("POST", "/v1/keys", {"name": "svc"}, 201)
    old = created["key"]
    assert created["scopes"] == ["read"] and created["tenant_id"] is None
    rotated = admin.ok("POST", f"/v1/keys/{created['id']}/rotate", {"grace_seconds": 60})
    new = rotated["key"]
    assert new != old and rotated["id"] == created["id"] and rotated["rotated_at"]
    assert rotated["previous_valid_until"] > time.time() + 50
    assert through_proxy(admin.proxy, old).status == 200
    assert through_proxy(admin.proxy, new).status == 200

    again = admin.ok("POST", f"/v1/keys/{created['id']}/rotate")  # no body: grace 0
    assert again["previous_valid_until"] is None
    assert through_proxy(admin.proxy, new).status == 401
    assert through_proxy(admin.proxy, again["key"]).status == 200

    admin.ok("DELETE", f"/v1/keys/{created['id']}")
    status, code, _ = admin.error("POST", f"/v1/keys/{created['id']}/rotate", {})
    assert (status, code) == (409, "conflict")


def test_patch_changes_only_the_fields_given_and_null_clears(admin: Admin) -> None:
    key = admin.ok(
        "POST",
        "/v1/keys",
        {
            "name": "k",
            "scopes": ["read"],
            "rate_limits": [{"requests": 5, "window_seconds": 1}],
            "quota": {"monthly_requests": 10},
            "expires_at": time.time() + 999,
            "metadata": {"a": 1},
        },
        201,
    )
    path = f"/v1/keys/{key['id']}"
    renamed = admin.ok("PATCH", path, {"name": "renamed"})
    assert renamed["name"] == "renamed"
    for field in ("scopes", "rate_limits", "quota", "expires_at", "metadata"):
        assert renamed[field] == key[field]
    cleared = admin.ok("PATCH", path, {"quota": None, "expires_at": None, "metadata": None})
    assert cleared["quota"] is None and cleared["expires_at"] is None
    assert cleared["metadata"] == {} and cleared["rate_limits"] == key["rate_limits"]
    assert cleared["name"] == "renamed"
    scoped = admin.ok("PATCH", path, {"scopes": ["write", "write"], "rate_limits": None})
    assert scoped["scopes"] == ["write"] and scoped["rate_limits"] == []

    status, code, message = admin.error("PATCH", path, {"name": None})
    assert (status, code) == (422, "invalid") and message.startswith("name:")
    assert admin.ok("GET", path)["name"] == "renamed"

    tenant = admin.ok("POST", "/v1/tenants", {"name": "T", "plan": "free"}, 201)
    tpath = f"/v1/tenants/{tenant['id']}"
    moved = admin.ok("PATCH", tpath, {"plan": "pro", "metadata": {"x": "y"}})
    assert moved["plan"] == "pro" and moved["name"] == "T" and moved["metadata"] == {"x": "y"}
    assert moved["updated_at"] >= tenant["updated_at"]
    status, code, message = admin.error("PATCH", tpath, {"plan": "platinum"})
    assert (status, code) == (422, "invalid") and "platinum" in message
    assert admin.ok("GET", tpath)["plan"] == "pro"


def test_pagination_and_filters(admin: Admin) -> None:
    tenant = admin.ok("POST", "/v1/tenants", {"name": "T", "plan": "pro"}, 201)
    ids = [
        admin.ok("POST", "/v1/keys", {"name": f"k{i}", "tenant_id": tenant["id"]}, 201)["id"]
        for i in range(5)
    ]
    other = admin.ok("POST", "/v1/keys", {"name": "solo"}, 201)["id"]
    admin.ok("DELETE", f"/v1/keys/{ids[1]}")
    admin.ok("POST", "/v1/keys", {"name": "old", "expires_at": time.time() - 1}, 201)

    seen, cursor, pages = [], None, 0
    while True:
        page = admin.ok("GET", "/v1/keys?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4 and len(seen) == 7 and len(set(seen)) == 7
    assert seen[:6] == [*ids, other]  # oldest first

    by_tenant = admin.ok("GET", f"/v1/keys?tenant_id={tenant['id']}")
    assert [k["id"] for k in by_tenant["items"]] == ids and by_tenant["next_cursor"] is None
    revoked = admin.ok("GET", "/v1/keys?status=revoked")["items"]
    assert [k["id"] for k in revoked] == [ids[1]]
    expired = admin.ok("GET", "/v1/keys?status=expired")["items"]
    assert [k["name"] for k in expired] == ["old"]
    active = admin.ok("GET", f"/v1/keys?status=active&tenant_id={tenant['id']}")["items"]
    assert len(active) == 4

    status, code, _ = admin.error("DELETE", f"/v1/tenants/{tenant['id']}")
    assert (status, code) == (409, "conflict")

    for i in range(3):
        admin.ok("POST", "/v1/tenants", {"name": f"t{i}", "plan": "free"}, 201)
    first = admin.ok("GET", "/v1/tenants?limit=3")
    rest = admin.ok("GET", f"/v1/tenants?limit=3&cursor={first['next_cursor']}")
    assert len(first["items"]) == 3 and len(rest["items"]) == 1 and rest["next_cursor"] is None

    plans = admin.ok("GET", "/v1/plans")
    assert [p["name"] for p in plans] == ["free", "pro"]
    assert plans[0]["monthly_quota"] == 1000 and plans[0]["limits"][0]["scope"] == "tenant"
    assert plans[1]["overage"] == "allow" and plans[1]["price_monthly_cents"] == 4900


@pytest.mark.parametrize(
    ("method", "path", "body", "expected"),
    [
        ("POST", "/v1/keys", b"{not json", (400, "bad_json", "not valid JSON")),
        ("POST", "/v1/keys", b"[1, 2]", (400, "bad_json", "JSON object")),
        ("POST", "/v1/tenants", b'"x"', (400, "bad_json", "JSON object")),
        ("POST", "/v1/keys", {"name": "k", "scope": ["read"]},
         (422, "invalid", "scope: unknown field")),
        ("POST", "/v1/keys", {}, (422, "invalid", "name: required")),
        ("POST", "/v1/keys", {"name": "k", "scopes": ["root"]}, (422, "invalid", "scopes[0]:")),
        ("POST", "/v1/keys", {"name": "k", "rate_limits": [{"requests": 0, "window_seconds": 1}]},
         (422, "invalid", "rate_limits[0].requests:")),
        ("POST", "/v1/keys", {"name": "k", "expires_at": 1, "expires_in_seconds": 5},
         (422, "invalid", "not both")),
        ("POST", "/v1/keys", {"name": "k", "tenant_id": "ten_nope"}, (422, "invalid", "ten_nope")),
        ("POST", "/v1/tenants", {"name": "t", "plan": "gold"}, (422, "invalid", "unknown plan")),
        ("POST", "/v1/tenants", {"name": "t", "plan": "free", "anchor_day": 31},
         (422, "invalid", "anchor_day:")),
        ("GET", "/v1/keys?limit=0", None, (422, "invalid", "limit:")),
        ("GET", "/v1/keys?limit=201", None, (422, "invalid", "limit:")),
        ("GET", "/v1/keys?limit=ten", None, (422, "invalid", "limit:")),
        ("GET", "/v1/keys?status=lost", None, (422, "invalid", "status:")),
        ("GET", "/v1/keys?cursor=%%%", None, (422, "invalid", "cursor:")),
        ("GET", "/v1/tenants?cursor=bm9wZQ", None, (422, "invalid", "cursor:")),
        ("GET", "/v1/audit?since=abc", None, (422, "invalid", "since:")),
        ("GET", "/v1/audit?since=1-0", None, (422, "invalid", "since:")),
        ("GET", "/v1/keys/key_missing", None, (404, "not_found", "key_missing")),
        ("PATCH", "/v1/keys/key_missing", {"name": "x"}, (404, "not_found", "key_missing")),
        ("DELETE", "/v1/keys/key_missing", None, (404, "not_found", "key_missing")),
        ("POST", "/v1/keys/key_missing/rotate", {}, (404, "not_found", "key_missing")),
        ("GET", "/v1/keys/key_missing/usage", None, (404, "not_found", "key_missing")),
        ("DELETE", "/v1/tenants/ten_missing", None, (404, "not_found", "ten_missing")),
        ("GET", "/v1/nothing", None, (404, "not_found", "")),
        ("PUT", "/v1/keys", None, (405, "method_not_allowed", "")),
        ("DELETE", "/v1/plans", None, (405, "method_not_allowed", "")),
    ],
)  # fmt: skip
def test_every_client_error_is_a_json_error(
    admin: Admin,
    method: str,
    path: str,
    body: Any,
    expected: tuple[int, str, str],
) -> None:
    status, code, in_message = expected
    if isinstance(body, bytes):
        got = admin.error(method, path, raw=body)
    else:
        got = admin.error(method, path, body)
    assert got[:2] == (status, code), got
    assert in_message in got[2]
    assert "Traceback" not in got[2]


def test_method_not_allowed_names_the_allowed_methods(admin: Admin) -> None:
    reply = admin.call("PUT", "/v1/keys")
    assert reply.status == 405 and set(reply.headers["Allow"].split(",")) >= {"GET", "POST"}


def test_the_api_needs_the_admin_token(admin: Admin) -> None:
    status, code, _ = admin.error("GET", "/v1/keys", token="wrong")
    assert (status, code) == (401, "unauthorized")
    assert request(admin.proxy.admin_port, "GET", "/v1/tenants").status == 401


def test_audit_records_every_change_without_secrets(admin: Admin) -> None:
    tenant = admin.ok("POST", "/v1/tenants", {"name": "T", "plan": "free"}, 201)
    admin.ok("PATCH", f"/v1/tenants/{tenant['id']}", {"name": "T2"})
    key = admin.ok("POST", "/v1/keys", {"name": "k", "tenant_id": tenant["id"]}, 201)
    admin.ok("PATCH", f"/v1/keys/{key['id']}", {"scopes": ["write"]})
    rotated = admin.ok("POST", f"/v1/keys/{key['id']}/rotate", {"grace_seconds": 5})
    admin.ok("DELETE", f"/v1/keys/{key['id']}")
    admin.ok("DELETE", f"/v1/tenants/{tenant['id']}")
    admin.error("PATCH", f"/v1/keys/{key['id']}", {"name": "after-revoke"})  # 409: no entry

    reply = admin.call("GET", "/v1/audit?limit=200")
    assert reply.status == 200
    entries = reply.json()["items"]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("tenant.create", tenant["id"]),
        ("tenant.update", tenant["id"]),
        ("key.create", key["id"]),
        ("key.update", key["id"]),
        ("key.rotate", key["id"]),
        ("key.revoke", key["id"]),
        ("tenant.delete", tenant["id"]),
    ]
    from shieldproxy.admin.audit import actor_id

    for entry in entries:
        assert entry["actor"] == actor_id(admin.token) and entry["ip"] == "127.0.0.1"
    text = reply.body.decode()
    for secret in (key["key"], rotated["key"], admin.token):
        assert secret not in text
    assert '"hash"' not in text and '"key":' not in text
    assert entries[1]["before"]["name"] == "T" and entries[1]["after"]["name"] == "T2"
    assert entries[2]["before"] is None and entries[2]["after"]["id"] == key["id"]
    assert entries[3]["before"]["scopes"] == ["read"] and entries[3]["after"]["scopes"] == ["write"]
    assert entries[4]["before"]["last4"] != entries[4]["after"]["last4"]
    assert entries[5]["after"]["status"] == "revoked" and entries[6]["after"] is None

    only = admin.ok("GET", f"/v1/audit?action=key.update&target={key['id']}")["items"]
    assert [e["action"] for e in only] == ["key.update"]
    assert admin.ok("GET", "/v1/audit?actor=adm_nobody")["items"] == []
    first = admin.ok("GET", "/v1/audit?limit=3")
    assert len(first["items"]) == 3 and first["next_cursor"]
    rest = admin.ok("GET", f"/v1/audit?limit=200&since={first['next_cursor']}")
    assert [e["id"] for e in first["items"] + rest["items"]] == [e["id"] for e in entries]


def test_openapi_document_is_valid_and_matches_the_routes(admin: Admin) -> None:
    reply = get(admin.proxy.admin_port, "/openapi.json")  # public: it holds no secrets
    assert reply.status == 200
    doc = reply.json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert doc["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    operations = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert ("POST", "/v1/keys/{id}/rotate") in operations and len(operations) == 14
    for method, path in operations:  # every documented operation is served
        reply = admin.call(method, path.replace("{id}", "x"))
        assert reply.status not in (404, 405) or reply.json()["error"]["message"].startswith("no ")
    create = doc["paths"]["/v1/keys"]["post"]
    assert set(create["responses"]) >= {"201", "400", "401", "422", "429"}
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/KeyCreate"
    }
    params = {p["name"]: p for p in doc["paths"]["/v1/keys"]["get"]["parameters"]}
    assert params["limit"]["schema"]["maximum"] == 200
    assert params["status"]["schema"]["enum"] == ["active", "revoked", "expired"]
    assert "key" not in doc["components"]["schemas"]["Key"]["properties"]


def test_docs_page_and_assets_load_locally(admin: Admin) -> None:
    page = get(admin.proxy.admin_port, "/docs")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    html = page.body.decode()
    assert "http://" not in html and "https://" not in html  # nothing from the internet
    assert 'url: "openapi.json"' in html
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):
        assert f"docs/static/{asset}" in html
        reply = get(admin.proxy.admin_port, f"/docs/static/{asset}")
        assert reply.status == 200 and len(reply.body) > 500, asset
    bundle = get(admin.proxy.admin_port, "/docs/static/swagger-ui-bundle.js").body
    assert b"SwaggerUIBundle" in bundle and b"isOAS31" in bundle  # renders OpenAPI 3.1
    assert get(admin.proxy.admin_port, "/docs/static/../admin-token").status != 200
    assert get(admin.proxy.admin_port, "/docs/static/swagger-editor.js").status == 404


def test_store_failure_is_a_503_not_a_500(proxy_factory: ProxyFactory, redis_server: Any) -> None:
    admin = Admin(proxy_factory(PLANS, auth=True, args=("--store", redis_server.url)))
    admin.ok("POST", "/v1/tenants", {"name": "T", "plan": "free"}, 201)
    redis_server.pause()
    try:
        status, code, _ = admin.error("GET", "/v1/tenants")
        assert (status, code) == (503, "store_unavailable")
        status, code, _ = admin.error("POST", "/v1/keys", {"name": "k"})
        assert (status, code) == (503, "store_unavailable")
    finally:
        redis_server.resume()
    assert admin.call("GET", "/v1/tenants").status == 200
