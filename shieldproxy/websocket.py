"""WebSocket passthrough: open the upstream socket first, accept the client only after 101.

Messages are relayed frame by frame with aiohttp's WebSocket implementations on both
sides, so each side negotiates its own framing while subprotocol, close codes and
ping/pong cross unchanged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, hdrs, web
from yarl import URL

from shieldproxy.context import RequestContext
from shieldproxy.errors import UpstreamTimeout, UpstreamUnavailable
from shieldproxy.forward import client_headers, forwarding_headers

if TYPE_CHECKING:
    from shieldproxy.state import Runtime

_WS_OWN = frozenset(
    {
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
        b"sec-websocket-accept",
    }
)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get(hdrs.UPGRADE)
    return (
        upgrade is not None
        and upgrade.lower() == "websocket"
        and "upgrade" in request.headers.get(hdrs.CONNECTION, "").lower()
        and request.method == "GET"
    )


def _upstream_ws_url(runtime: Runtime, ctx: RequestContext) -> URL:
    base = URL(runtime.config.upstream.url)
    scheme = "wss" if base.scheme == "https" else "ws"
    target = base.raw_path.rstrip("/") + ctx.path + (f"?{ctx.query}" if ctx.query else "")
    return URL(f"{scheme}://{base.raw_authority}{target}", encoded=True)


async def relay_websocket(ctx: RequestContext, runtime: Runtime) -> web.StreamResponse:
    request = ctx.request
    headers = [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in client_headers(ctx)
        if name.lower() not in _WS_OWN
    ]
    headers += forwarding_headers(ctx)
    if ctx.key is not None:
        headers += ctx.key.identity_headers  # the caller's identity, in place of its key
    protocols = [
        p.strip()
        for value in request.headers.getall(hdrs.SEC_WEBSOCKET_PROTOCOL, ())
        for p in value.split(",")
        if p.strip()
    ]
    session = runtime.websocket_session()
    upstream_timeout = runtime.config.upstream
    try:
        upstream = await session.ws_connect(
            _upstream_ws_url(runtime, ctx),
            headers=headers,
            protocols=protocols,
            autoping=False,
            timeout=aiohttp.ClientWSTimeout(ws_close=upstream_timeout.read_timeout_seconds),
        )
    except aiohttp.WSServerHandshakeError as exc:
        raise UpstreamUnavailable(
            f"the upstream refused the upgrade ({exc.status})", "ws"
        ) from None
    except TimeoutError:
        raise UpstreamTimeout("the upstream did not accept the upgrade in time", "ws") from None
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"cannot open the upstream WebSocket: {exc}", "ws") from None
    client = web.WebSocketResponse(
        protocols=[upstream.protocol] if upstream.protocol else (), autoping=False
    )
    client.headers["X-Request-Id"] = ctx.request_id
    await client.prepare(request)
    ctx.sent_status = client.status
    await _pump_both(client, upstream)
    return client


async def _pump_both(
    client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.PING:
                await sink.ping(message.data)
            elif message.type == WSMsgType.PONG:
                await sink.pong(message.data)
        code = source.close_code or 1000
        await sink.close(code=code, message=b"")

    tasks = [
        asyncio.ensure_future(pump(client, upstream)),
        asyncio.ensure_future(pump(upstream, client)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
        await client.close()
