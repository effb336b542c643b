"""open_store: one switch over the URL scheme, with one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldproxy.store import open_store
from shieldproxy.store.local import LocalStore
from shieldproxy.store.redis import RedisStore
from shieldproxy.store.redis_cluster import RedisClusterStore


async def test_schemes(tmp_path: Path) -> None:
    local = open_store("local", data_dir=tmp_path)
    assert isinstance(local, LocalStore) and not local.shared
    r = open_store("redis://127.0.0.1:1/0", data_dir=tmp_path)
    assert type(r) is RedisStore and r.shared
    rs = open_store("rediss://127.0.0.1:1/0", data_dir=tmp_path)
    c = open_store("redis+cluster://127.0.0.1:1,127.0.0.1:2", data_dir=tmp_path)
    assert isinstance(c, RedisClusterStore)
    for s in (local, r, rs):
        await s.close()


@pytest.mark.parametrize(
    ("url", "workers", "message"),
    [
        ("local", 4, "the local store keeps counters in one process"),
        ("local://x", 1, "takes no address"),
        ("memcached://x", 1, "unknown scheme 'memcached'"),
        ("", 1, "unknown scheme"),
        ("redis+cluster://a:1,b", 1, "host:port,host:port"),
    ],
)
def test_bad_urls(tmp_path: Path, url: str, workers: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_store(url, data_dir=tmp_path, workers=workers)
    assert "\n" not in str(info.value)


async def test_local_records_survive_reopen(tmp_path: Path) -> None:
    s = open_store("local", data_dir=tmp_path)
    await s.put_record("ban", "1.2.3.4", {"reason": "abuse"})
    await s.append_event("audit", {"what": "ban"})
    await s.close()
    s = open_store("local", data_dir=tmp_path)
    assert await s.get_record("ban", "1.2.3.4") == {"reason": "abuse"}
    assert [e.doc for e in await s.list_events("audit")] == [{"what": "ban"}]
    assert (tmp_path / "shieldproxy.db").exists()
    await s.close()
