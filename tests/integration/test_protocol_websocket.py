"""WebSocket upgrade passthrough: frames, subprotocol and close codes cross the proxy."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from tests.fixtures.processes import Proxy, Upstream
from tests.integration.test_protocol_smuggling import (
    assert_error,
    exchange_one,
    module_proxy,
)


@pytest.fixture(scope="module")
def ws_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    yield from module_proxy(tmp_path_factory, upstream.url)


async def test_websocket_echo_subprotocol_and_close_code(ws_proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{ws_proxy.url}/ws", protocols=("chat.v1",)) as ws,
    ):
        assert ws.protocol == "chat.v1"
        await ws.send_str("hello")
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.TEXT
        assert message.data == "echo: hello"
        await ws.send_bytes(b"\x01\x02\x03")
        message = await ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.BINARY
        assert message.data == b"\x03\x02\x01"
        await ws.send_str("close")
        message = await ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == 4000


async def test_websocket_without_subprotocol_request(ws_proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{ws_proxy.url}/ws") as ws:
        assert ws.protocol is None
        for i in range(20):
            await ws.send_str(f"m{i}")
        received = [(await ws.receive(timeout=5)).data for _ in range(20)]
        assert received == [f"echo: m{i}" for i in range(20)]


async def test_websocket_client_close_leaves_the_proxy_healthy(ws_proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{ws_proxy.url}/ws")
        await ws.close(code=4001)
        assert ws.closed
        async with session.get(f"{ws_proxy.url}/after") as response:
            assert response.status == 200


async def test_rejected_upgrade_is_an_error_not_101(ws_proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await session.ws_connect(f"{ws_proxy.url}/ws-reject")
    assert info.value.status != 101
    assert info.value.status >= 400


def test_rejected_upgrade_answer_has_the_error_shape(ws_proxy: Proxy) -> None:
    response = exchange_one(
        ws_proxy.port,
        b"GET /ws-reject HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        timeout=3,
    )
    assert response.status >= 400
    assert_error(response.status, response.body, response.status, None)
