"""Peer baseline for the rate-limit benchmark: the usual FastAPI + Redis sliding-window limiter.

What a team typically writes instead of a gateway: an `@app.middleware("http")` that runs the
classic sorted-set sliding window (ZREMRANGEBYSCORE, ZADD, ZCARD, EXPIRE in one MULTI) through
redis.asyncio for one key per request, then a catch-all route forwarding to the upstream.
The upstream client is aiohttp (one pooled ClientSession, proxy-safe settings): it is already a
shieldproxy dependency and faster than httpx, so the peer is not handicapped by its client.
It serves with uvicorn (uvloop + httptools, 1 worker, no access log), its fastest setup.

    python benchmarks/peer_fastapi.py --upstream http://127.0.0.1:9000 --listen 127.0.0.1:8092 \
        --redis redis://127.0.0.1:6379/0 [--limit 1000000000 --window 60]
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiohttp
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from reference_proxy import _SKIP_REQUEST
from starlette.requests import ClientDisconnect

# The reference proxy's hop-by-hop set (run as a script, so the sibling module imports), plus
# the length the client recomputes.
_HOP_BY_HOP = _SKIP_REQUEST | {"content-length"}
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def build_app(upstream: str, redis_url: str, limit: int, window_s: float) -> FastAPI:
    """The app, with its Redis client and upstream session living as long as the app."""
    base = upstream.rstrip("/")
    window_ms = int(window_s * 1000)
    expire_s = max(1, int(window_s))
    sequence = itertools.count()  # unique ZADD members even within one millisecond

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = aioredis.Redis.from_url(redis_url)
        app.state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=60.0),
        )
        yield
        await app.state.session.close()
        await app.state.redis.aclose()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def sliding_window(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        # One key per request: the bearer credential if any, else the client address.
        subject = request.headers.get("authorization") or (
            request.client.host if request.client else "-"
        )
        key = f"peer:rl:{subject}"
        now = int(time.time() * 1000)
        async with request.app.state.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, 0, now - window_ms)
            pipe.zadd(key, {f"{now}-{next(sequence)}": now})
            pipe.zcard(key)
            pipe.expire(key, expire_s)
            _, _, count, _ = await pipe.execute()
        if count > limit:
            return JSONResponse({"error": "rate_limited"}, status_code=429)
        return await call_next(request)

    @app.api_route("/{path:path}", methods=_METHODS)
    async def forward(request: Request, path: str) -> Response:
        headers = {k: v for k, v in request.headers.items() if k not in _HOP_BY_HOP}
        url = f"{base}/{path}" + (f"?{request.url.query}" if request.url.query else "")
        try:
            body = await request.body()
        except ClientDisconnect:
            # wrk hangs up mid-request when a run ends; nobody is left to answer.
            return Response(status_code=499)
        session: aiohttp.ClientSession = request.app.state.session
        try:
            async with session.request(
                request.method, url, headers=headers, data=body or None, allow_redirects=False
            ) as upstream_response:
                # Typical FastAPI proxy code buffers the (here 11-byte) body into a Response.
                content = await upstream_response.read()
                out = {
                    k: v
                    for k, v in upstream_response.headers.items()
                    if k.lower() not in _HOP_BY_HOP
                }
                return Response(content, upstream_response.status, out)
        except (aiohttp.ClientError, TimeoutError):
            return JSONResponse({"error": "bad_gateway"}, status_code=502)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, metavar="URL")
    parser.add_argument("--listen", default="127.0.0.1:8092", metavar="HOST:PORT")
    parser.add_argument("--redis", required=True, metavar="URL")
    parser.add_argument("--limit", type=int, default=10**9, help="requests per window")
    parser.add_argument("--window", type=float, default=60.0, help="window seconds [60]")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    app = build_app(args.upstream, args.redis, args.limit, args.window)
    uvicorn.run(
        app,
        host=host,
        port=int(port),
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
