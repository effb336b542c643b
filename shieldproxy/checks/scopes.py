"""Authorize: the key must hold the scopes the route (or the method) needs."""

from __future__ import annotations

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny
from shieldproxy.keys.records import READ_METHODS

_READ = frozenset({"read"})
_WRITE = frozenset({"write"})


class ScopesCheck:
    """GET/HEAD/OPTIONS need `read`, other methods `write`, unless the route names scopes.
    Runs before the upstream is contacted: a key lacking scopes costs the upstream nothing."""

    name = "scopes"

    def decide(self, ctx: RequestContext) -> Decision:
        key = ctx.key
        if key is None:
            return ALLOW  # auth not required on this route and no key given
        route = ctx.route
        needed: frozenset[str]
        if route is not None and route.scopes:
            needed = route.scopes
            if key.allows(needed):
                return ALLOW
        elif ctx.request.method in READ_METHODS:
            if key.reads:
                return ALLOW
            needed = _READ
        else:
            if key.writes:
                return ALLOW
            needed = _WRITE
        missing = ", ".join(sorted(needed - key.scopes))
        return deny(403, "insufficient_scope", f"the API key lacks the scope: {missing}")
