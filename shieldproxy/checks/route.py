"""Find the [[routes]] entry for the canonical path (never denies)."""

from __future__ import annotations

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision
from shieldproxy.routes import RouteTable


class RouteCheck:
    name = "route"

    def __init__(self, table: RouteTable) -> None:
        self._table = table

    def decide(self, ctx: RequestContext) -> Decision:
        if self._table.routes:
            ctx.route = self._table.match(ctx.request.method, ctx.path)
        return ALLOW
