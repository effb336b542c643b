"""Baseline for the benchmarks: a minimal, correctly configured aiohttp pass-through proxy.

It is the "naive aiohttp proxy" of DESIGN §6, but not a straw man: one pooled
ClientSession per process, no cookie jar, no decompression, no redirects, no total
timeout, streamed bodies, and aiohttp's low-level server (the same server layer
shieldproxy uses), so the ratio isolates what shieldproxy does differently: its own
upstream client and its request pipeline.

    python benchmarks/reference_proxy.py --upstream http://127.0.0.1:9000 --listen 127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 §7.6.1 hop-by-hop fields; Host is set by the client session from the URL.
_SKIP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_SKIP_RESPONSE = (_SKIP_REQUEST - {"host"}) | {"content-length"}


def _filtered(headers: CIMultiDictProxy[str], skip: frozenset[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in skip:
            out.add(name, value)
    return out


class ReferenceProxy:
    """Forwards every request to one upstream through one shared session."""

    def __init__(self, upstream: str) -> None:
        self._upstream = upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0, sock_read=60.0),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        response = web.StreamResponse()
        try:
            async with self._session.request(
                request.method,
                self._upstream + request.raw_path,
                headers=_filtered(request.headers, _SKIP_REQUEST),
                data=request.content if request.body_exists else None,
                allow_redirects=False,
            ) as upstream:
                response.set_status(upstream.status, upstream.reason)
                response.headers.update(_filtered(upstream.headers, _SKIP_RESPONSE))
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        except ConnectionResetError:
            # The client left (wrk stops mid-request at the end of a run). Returning the
            # response lets aiohttp see the closed transport and drop the connection
            # quietly; raising would log a traceback per connection.
            pass
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError):
            if not response.prepared:
                return web.Response(status=502, text="bad gateway")
            if request.transport is not None:
                request.transport.close()  # headers are out: a cut connection, not a 502
        return response


async def _serve(upstream: str, host: str, port: int) -> None:
    proxy = ReferenceProxy(upstream)
    await proxy.start()
    # access_log=None: logging every request would dominate the cost being measured.
    runner = web.ServerRunner(web.Server(proxy, access_log=None), shutdown_timeout=2.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()
    await proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, metavar="URL")
    parser.add_argument("--listen", default="127.0.0.1:8090", metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvloop.run(_serve(args.upstream, host, int(port)))


if __name__ == "__main__":
    main()
