"""Generated secrets (admin token, key hashing secret): workers that start together agree."""

from __future__ import annotations

import multiprocessing
import stat
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from shieldproxy.admin.auth import TokenGuard, load_or_create_secret


def _create_after(barrier: Barrier, path: str, results: multiprocessing.Queue[str]) -> None:
    barrier.wait()
    try:
        results.put(load_or_create_secret(Path(path), "spkey_", "a test secret"))
    except Exception as exc:  # the parent reports it
        results.put(f"error: {exc!r}")


def test_workers_starting_together_all_get_the_one_secret(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    racers = 6
    for attempt in range(15):
        path = tmp_path / f"key-secret-{attempt}"
        barrier = context.Barrier(racers)
        results: multiprocessing.Queue[str] = context.Queue()
        processes = [
            context.Process(target=_create_after, args=(barrier, str(path), results))
            for _ in range(racers)
        ]
        for process in processes:
            process.start()
        seen = {results.get(timeout=30) for _ in processes}
        for process in processes:
            process.join(10)
        assert seen == {path.read_text().strip()}, seen
        assert next(iter(seen)).startswith("spkey_")
    # no drafts left behind
    assert {p.name for p in tmp_path.iterdir()} == {f"key-secret-{n}" for n in range(15)}


def test_a_generated_secret_is_private_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "deeper" / "admin-token"
    token = load_or_create_secret(path, "spadm_", "an admin token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path, "spadm_", "an admin token") == token
    assert [p.name for p in path.parent.iterdir()] == ["admin-token"]


def test_an_empty_secret_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "key-secret"
    path.write_text("\n")
    with pytest.raises(ValueError, match="key-secret is empty: restore it, or delete it"):
        load_or_create_secret(path, "spkey_", "a key hashing secret")
    assert path.read_text() == "\n"


def test_an_empty_admin_token_is_never_served() -> None:
    """What a worker that read a half-written token file once served with: an empty token,
    which an empty `Authorization: Bearer ` header matched."""
    with pytest.raises(ValueError, match="admin token is empty"):
        TokenGuard("")
    guard = TokenGuard("spadm_x")
    assert not guard.check("127.0.0.1", "")
    assert guard.check("127.0.0.1", "spadm_x")
