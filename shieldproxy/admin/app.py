"""The admin aiohttp app: /healthz, /readyz, /metrics, behind the admin bearer token."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from shieldproxy.admin.auth import TokenGuard
from shieldproxy.metrics import MetricsCollector, SnapshotFiles
from shieldproxy.state import ProxyState

STATE = web.AppKey("state", ProxyState)
GUARD = web.AppKey("guard", TokenGuard)
REGISTRY = web.AppKey("registry", CollectorRegistry)
PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    guard = request.app[GUARD]
    ip = request.remote or ""
    wait = guard.blocked(ip)
    if wait:
        response = error_response(429, "too_many_attempts", "too many failed admin logins")
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not guard.check(ip, token.strip() if scheme.lower() == "bearer" else None):
        response = error_response(401, "unauthorized", "a valid admin bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="shieldproxy-admin"'
        return response
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every admin error, including aiohttp's own 404/405, as the contract's JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
        return error_response(exc.status, code, exc.reason)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        body = {"status": "unavailable", "degraded": False, "draining": True}
        return web.json_response(body, status=503)
    body = {"status": "ok", "degraded": False, "draining": False, "worker": state.worker_index}
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    output = generate_latest(request.app[REGISTRY])
    return web.Response(body=output, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_admin_app(state: ProxyState, token: str) -> web.Application:
    app = web.Application(middlewares=[json_errors, admin_auth], client_max_size=1024**2)
    app[STATE] = state
    app[GUARD] = TokenGuard(token)
    registry = CollectorRegistry(auto_describe=False)
    files = SnapshotFiles(state.data_dir / "run", state.worker_index) if state.workers > 1 else None
    registry.register(MetricsCollector(state.metrics, files))
    app[REGISTRY] = registry
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
