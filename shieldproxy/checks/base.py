"""The Check protocol every decision module implements."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision


class Check(Protocol):
    """A check reads the context, writes only its own fields, and returns a Decision.

    It answers at once whenever it can, which for a known caller is always: only a check
    that must wait for the store (a key not cached yet, a limit not answered from local
    state) returns an awaitable of its Decision instead. Why: a request meets every check,
    and a coroutine per check was a tenth of a denied request's cost (see Pipeline.run).
    """

    name: str

    def decide(self, ctx: RequestContext) -> Decision | Awaitable[Decision]: ...


async def decided(check: Check, ctx: RequestContext) -> Decision:
    """`check`'s Decision, awaited when it has to be (for callers off the hot path)."""
    decision = check.decide(ctx)
    return decision if isinstance(decision, Decision) else await decision
