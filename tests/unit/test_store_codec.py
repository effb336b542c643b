"""The packed limits.lua codec: one ARGV string per request, tokens sized so any bytes survive."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from shieldproxy.store import LimitCall, open_store
from shieldproxy.store.base import CallResult
from shieldproxy.store.scripts import decode, encode, encode_refund
from tests.fixtures.redis_servers import RedisServer

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_040_000


def lc(strategy: str, token: str, *, key: str = "k", cost: int = 1) -> LimitCall:
    return LimitCall(key, strategy, 3, 1000, 3, cost, False, token)  # type: ignore[arg-type]


def test_encode_packs_one_argv_string_per_request() -> None:
    q = LimitCall("q", "quota", 10, 60_000, 10, 2, True, "t:1", T0, extra=5)
    keys, args = encode([[lc("fixed_window", "t:1"), q], [lc("sliding_log", "é,:")]], "acquire", T0)
    assert keys == [b"k", b"q", b"k"]
    assert args == [
        b"%d" % T0,
        b"acquire",
        b"fixed_window,3,1000,3,0,0,1,0,0,3:t:1quota,10,60000,10,1,%d,2,0,5,3:t:1" % T0,
        "sliding_log,3,1000,3,0,0,1,0,0,4:é,:".encode(),
    ]
    _, refund = encode_refund([lc("fixed_window", "x")], [T0], None)
    assert refund == [b"", b"refund", b"fixed_window,3,1000,3,0,0,1,%d,0,1:x" % T0]


def test_decode_splits_the_flat_reply_per_request() -> None:
    reqs = [[lc("fixed_window", "a"), lc("quota", "a")], [lc("token_bucket", "b")]]
    flat = [1, 2, 3, 0, 4, 0, 6, 0, 0, 9, 9, 0, 5, 0, 1, 7, 8, 0, 0, 0, 0]
    assert decode(flat, reqs) == [
        [CallResult(True, 2, 3, 0, 4, 0, 6), CallResult(False, 0, 9, 9, 0, 5)],
        [CallResult(True, 7, 8, 0, 0, 0)],
    ]


async def test_awkward_tokens_reach_lua_intact(redis_server: RedisServer, tmp_path: Path) -> None:
    store = open_store(redis_server.url, data_dir=tmp_path, fake_time=lambda: T0 / 1000)
    raw = aioredis.Redis.from_url(redis_server.url)
    await raw.flushall()
    try:
        tokens = ["a,b:c", "7:xyz", "ünï,cødé:", ""]
        for i, tok in enumerate(tokens):
            got = await store.acquire([lc("concurrency", tok, key="cc", cost=1)])
            assert got[0].allowed == (i < 3)  # the fourth exceeds the limit of 3
        members = {m.decode() for m in await raw.zrange("cc", 0, -1)}
        assert members == {f"{t}:1" for t in tokens[:3]}
        for tok in tokens[:3]:
            await store.release([lc("concurrency", tok, key="cc")])
        assert await raw.zcard("cc") == 0
        logged = await store.acquire([lc("sliding_log", "ünï,cødé:", key="sl", cost=2)])
        assert logged[0].allowed
        assert {m.decode() for m in await raw.zrange("sl", 0, -1)} == {"ünï,cødé::1", "ünï,cødé::2"}
    finally:
        await raw.aclose()
        await store.close()
