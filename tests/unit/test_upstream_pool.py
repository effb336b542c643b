"""UpstreamPool at its cap, on a real loopback listener: who gets a freed slot."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from shieldproxy.upstream import PoolSettings, UpstreamPool

pytestmark = pytest.mark.timeout(30)


async def test_a_slot_freed_for_a_waiter_that_hung_up_goes_to_the_next() -> None:
    """Woken for the one slot, then cancelled before taking it (its client went away): the
    slot must reach the next waiter, not be lost until that one times out."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # accepts, says nothing
    port = server.sockets[0].getsockname()[1]
    settings = PoolSettings(
        connect_timeout=3.0, read_timeout=5.0, max_connections=1, max_idle=0, idle_timeout=30
    )
    pool = UpstreamPool(URL(f"http://127.0.0.1:{port}"), settings, loop)
    holder = await pool.connect()
    first = asyncio.create_task(pool.connect())
    second = asyncio.create_task(pool.connect())
    await asyncio.sleep(0.05)  # both wait for the slot
    wake = pool._wake_waiter

    def wake_then_hang_up() -> None:
        pool._wake_waiter = wake  # type: ignore[method-assign]
        wake()  # `first` is woken for the freed slot...
        first.cancel()  # ...and its client hangs up before it runs again

    pool._wake_waiter = wake_then_hang_up  # type: ignore[method-assign]
    started = loop.time()
    holder.close()  # the slot frees once the socket is gone
    conn = await asyncio.wait_for(second, 2.0)
    assert loop.time() - started < 1.0
    assert pool.open_connections == 1
    conn.close()
    await asyncio.gather(first, return_exceptions=True)
    await pool.close()
    server.close()
    await server.wait_closed()
