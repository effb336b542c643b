"""The admin aiohttp app: health, metrics, the /v1 API and its docs, behind the admin token."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from shieldproxy.admin import api, docs
from shieldproxy.admin.api import ApiError
from shieldproxy.admin.auth import TokenGuard, bearer_token
from shieldproxy.keys.registry import RegistryError
from shieldproxy.metrics import MetricsCollector, SnapshotFiles
from shieldproxy.state import ProxyState
from shieldproxy.store.base import StoreError

log = logging.getLogger("shieldproxy.admin")

STATE = web.AppKey("state", ProxyState)
GUARD = web.AppKey("guard", TokenGuard)
REGISTRY = web.AppKey("registry", CollectorRegistry)
# The API description and the docs page hold no secrets, and the page must load before its
# Authorize button can ask for the token; every call the page then makes carries the token.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/docs/static/",)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    guard = request.app[GUARD]
    ip = request.remote or ""
    wait = guard.blocked(ip)
    if wait:
        response = error_response(429, "too_many_attempts", "too many failed admin logins")
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    if not guard.check(ip, bearer_token(request)):
        response = error_response(401, "unauthorized", "a valid admin bearer token is required")
        response.headers["WWW-Authenticate"] = 'Bearer realm="shieldproxy-admin"'
        return response
    return await handler(request)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every admin error as the contract's JSON: the one place exceptions become statuses."""
    try:
        return await handler(request)
    except (ApiError, RegistryError) as exc:
        return error_response(exc.status, exc.code, str(exc))
    except StoreError as exc:
        log.warning("admin %s %s: store error: %s", request.method, request.path, exc)
        return error_response(503, "store_unavailable", "the store did not answer; try again")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(
            exc.status, _HTTP_CODES.get(exc.status, "bad_request"), exc.reason
        )
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        # The boundary of the admin app: a bug still answers in the contract's shape, and the
        # traceback goes to the log, never to the client.
        log.exception("admin %s %s failed", request.method, request.path)
        return error_response(500, "internal_error", "internal error; see the server log")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        body = {"status": "unavailable", "degraded": False, "draining": True}
        return web.json_response(body, status=503)
    degraded = state.limiter.degraded
    body = {
        "status": "degraded" if degraded else "ok",
        "degraded": degraded,
        "draining": False,
        "worker": state.worker_index,
        "store": state.runtime.config.store.url.split("://")[0],
        "live_instances": state.limiter.live_instances,
    }
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
    api.register(app, state)
    docs.register(app)
    return app
