"""ApiKeyCheck on a real registry (local store): a known caller is answered at once, a new
secret waits for the store, and an optional key that does not check out is anonymous."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from shieldproxy.checks.api_key import ApiKeyCheck
from shieldproxy.config import Config, load_config
from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.keys.secret import KeyHasher
from shieldproxy.store import open_store

NOW = 1_800_000_000.0  # the check's wall clock
EXPIRES = NOW + 60


def config(tmp_path: Path, *, required: bool) -> Config:
    path = tmp_path / "shieldproxy.toml"
    path.write_text(f"[auth]\nrequired = {str(required).lower()}\n")
    return load_config(path, env={})


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[KeyRegistry]:
    store = open_store("local", data_dir=tmp_path)
    yield KeyRegistry(store, KeyHasher(b"k" * 32), config(tmp_path, required=True))
    await store.close()


def request(secret: str | None) -> RequestContext:
    headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
    return RequestContext(make_mocked_request("GET", "/v1/items", headers=headers), "r-1", 0.0)


async def decide(check: ApiKeyCheck, ctx: RequestContext) -> tuple[Decision, bool]:
    """The decision, and whether the check had to wait for it."""
    decision = check.decide(ctx)
    if isinstance(decision, Decision):
        return decision, False
    return await decision, True


async def test_a_known_caller_is_answered_without_waiting(
    registry: KeyRegistry, tmp_path: Path
) -> None:
    _, secret = await registry.create_key({"name": "k", "scopes": ["read"]})
    check = ApiKeyCheck(config(tmp_path, required=True), registry, wall_clock=lambda: NOW)
    first, ctx = request(secret), request(secret)
    assert await decide(check, first) == (ALLOW, True)  # looked up in the store
    assert await decide(check, ctx) == (ALLOW, False)  # from the cache, synchronously
    assert ctx.key is not None and ctx.key_id == ctx.key.id
    assert ctx.key.identity_lines == b"".join(
        f"{name}: {value}\r\n".encode() for name, value in ctx.key.identity_headers
    )


@pytest.mark.parametrize("required", [True, False])
async def test_a_key_that_does_not_check_out_is_anonymous_when_optional(
    registry: KeyRegistry, tmp_path: Path, required: bool
) -> None:
    _, secret = await registry.create_key({"name": "k", "expires_at": EXPIRES})
    later = ApiKeyCheck(config(tmp_path, required=required), registry, wall_clock=lambda: EXPIRES)
    await decide(later, request(secret))  # the key's view is cached from here on
    cases = [
        ("sp_live_not-a-real-key", True, "invalid_key"),  # a lookup, then refused
        (secret, False, "expired_key"),  # cached, then refused at once
    ]
    for given, waited, code in cases:
        ctx = request(given)
        decision, did_wait = await decide(later, ctx)
        assert did_wait is waited
        if required:
            assert (decision.status, decision.code) == (401, code)
        else:
            assert decision is ALLOW and ctx.key is None and ctx.key_id == ""
