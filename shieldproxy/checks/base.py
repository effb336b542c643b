"""The Check protocol every decision module implements."""

from __future__ import annotations

from typing import Protocol

from shieldproxy.context import RequestContext
from shieldproxy.decision import Decision


class Check(Protocol):
    """A check reads the context, writes only its own fields, and returns a Decision."""

    name: str

    async def decide(self, ctx: RequestContext) -> Decision: ...
