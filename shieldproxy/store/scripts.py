"""Lua script sources (package data) and the argument/reply codec shared by the Redis stores."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from shieldproxy.store.base import CallResult, LimitCall, StoreMisuse

_FIELDS = 6  # integers per call in an "acquire" reply, see limits.lua
_ARGS = 9  # ARGV fields per call, see limits.lua


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua file read once; the SHA1 is computed locally so EVALSHA needs no SCRIPT LOAD trip."""

    name: str
    source: str
    sha: str


def load_script(name: str) -> Script:
    source = resources.files("shieldproxy.store").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return Script(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


def encode(
    requests: Sequence[Sequence[LimitCall]], mode: str, now_ms: int | None
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV for limits.lua evaluating `requests` in order (see the script header)."""
    keys: list[str] = []
    args: list[str | int] = ["" if now_ms is None else now_ms, mode, len(requests)]
    for calls in requests:
        args.append(len(calls))
        for c in calls:
            keys.append(c.key)
            args += [
                c.strategy, c.limit, c.window_ms, c.burst, c.cost,
                "1" if c.shadow else "0", c.token, 0, c.period_end_ms,
            ]  # fmt: skip
    return keys, args


def encode_refund(
    calls: Sequence[tuple[LimitCall, CallResult]], now_ms: int | None
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV undoing earlier acquires; the stamp tells the script which window to fix."""
    keys, args = encode([[c for c, _ in calls]], "refund", now_ms)
    for i, (_, r) in enumerate(calls):
        args[4 + i * _ARGS + 7] = r.stamp
    return keys, args


def decode(reply: object, requests: Sequence[Sequence[LimitCall]]) -> list[list[CallResult]]:
    """Split a flat "acquire" reply into per-request lists of CallResult."""
    if not isinstance(reply, list) or len(reply) != _FIELDS * sum(len(r) for r in requests):
        raise StoreMisuse(f"unexpected limits.lua reply: {reply!r:.200}")
    out: list[list[CallResult]] = []
    i = 0
    for calls in requests:
        row = []
        for _ in calls:
            allowed, remaining, reset, retry, stamp, used = reply[i : i + _FIELDS]
            row.append(CallResult(allowed == 1, remaining, reset, retry, stamp, used))
            i += _FIELDS
        out.append(row)
    return out
