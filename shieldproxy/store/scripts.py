"""Lua script sources (package data) and the argument/reply codec shared by the Redis stores."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources

from shieldproxy.store.base import CallResult, LimitCall, StoreMisuse

_FIELDS = 7  # integers per call in an "acquire" reply, see limits.lua

# Per-rule constant head of a call record (strategy, limit, window, burst, shadow, period end),
# cached as text: a proxy has few rules, so this stays small; cleared if it ever grows.
_heads: dict[tuple[str, int, int, int, bool, int], str] = {}
_MAX_HEADS = 4096


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua file read once; the SHA1 is computed locally so EVALSHA needs no SCRIPT LOAD trip."""

    name: str
    source: str
    sha: str


def load_script(name: str) -> Script:
    source = resources.files("shieldproxy.store").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return Script(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


def _new_head(c: LimitCall) -> str:
    if len(_heads) >= _MAX_HEADS:
        _heads.clear()
    head = _heads[(c.strategy, c.limit, c.window_ms, c.burst, c.shadow, c.period_end_ms)] = (
        f"{c.strategy},{c.limit},{c.window_ms},{c.burst},{1 if c.shadow else 0},{c.period_end_ms},"
    )
    return head


def _pack(calls: Sequence[LimitCall], stamps: Sequence[int] | None = None) -> bytes:
    """One request's calls as a single ARGV string of call records (see the limits.lua header).

    Hot path: one dict lookup for the rule's constant head and one f-string per call.
    """
    parts = []
    for i, c in enumerate(calls):
        head = _heads.get((c.strategy, c.limit, c.window_ms, c.burst, c.shadow, c.period_end_ms))
        if head is None:
            head = _new_head(c)
        token = c.token
        stamp = 0 if stamps is None else stamps[i]
        parts.append(f"{head}{c.cost},{stamp},{c.extra},{len(token)}:{token}")
    text = "".join(parts)
    data = text.encode()
    if len(data) == len(text):
        return data
    # Not ASCII: a token's size prefix must count its bytes, not its characters.
    out = []
    for i, c in enumerate(calls):
        token_bytes = c.token.encode()
        stamp = 0 if stamps is None else stamps[i]
        head = _new_head(c)
        out.append(f"{head}{c.cost},{stamp},{c.extra},{len(token_bytes)}:".encode() + token_bytes)
    return b"".join(out)


def encode(
    requests: Sequence[Sequence[LimitCall]], mode: str, now_ms: int | None
) -> tuple[list[bytes], list[bytes]]:
    """KEYS and ARGV for limits.lua evaluating `requests` in order (see the script header).

    Everything is pre-encoded bytes: redis-py then passes each argument through untouched, and
    each request is one ARGV string however many calls it has.
    """
    keys = [c.key.encode() for calls in requests for c in calls]
    args = [b"" if now_ms is None else b"%d" % now_ms, mode.encode()]
    args += [_pack(calls) for calls in requests]
    return keys, args


def encode_refund(
    calls: Sequence[LimitCall], stamps: Sequence[int], now_ms: int | None
) -> tuple[list[bytes], list[bytes]]:
    """KEYS and ARGV giving back each call's cost; its stamp tells the script which window."""
    keys = [c.key.encode() for c in calls]
    args = [b"" if now_ms is None else b"%d" % now_ms, b"refund", _pack(calls, stamps)]
    return keys, args


def decode(reply: object, requests: Sequence[Sequence[LimitCall]]) -> list[list[CallResult]]:
    """Split a flat "acquire" reply into per-request lists of CallResult."""
    if not isinstance(reply, list) or len(reply) != _FIELDS * sum(len(r) for r in requests):
        raise StoreMisuse(f"unexpected limits.lua reply: {reply!r:.200}")
    it = iter(reply)
    fields = zip(it, it, it, it, it, it, it, strict=True)  # _FIELDS per call
    rows = [
        CallResult(a == 1, rem, reset, retry, stamp, used, granted)
        for a, rem, reset, retry, stamp, used, granted in fields
    ]
    out: list[list[CallResult]] = []
    i = 0
    for calls in requests:
        n = len(calls)
        out.append(rows[i : i + n])
        i += n
    return out
