"""Route table: [[routes]] patterns compiled once, matched on the canonical path."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shieldproxy.config import RouteConfig

# Remembered (method, path) pairs per route table, of paths up to this long: at most about
# 1 MiB however long the paths a client sends (the request line may be 64 KiB).
_SEEN_MAX = 4096
_SEEN_PATH_MAX = 256


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled [[routes]] entry; `name` is the label used by metrics and limits."""

    name: str
    config: RouteConfig
    pattern: re.Pattern[str]
    methods: frozenset[str]
    scopes: frozenset[str] = frozenset()  # what a key needs here (empty: by the method)

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and (
            self.pattern.fullmatch(path) is not None
        )


def compile_pattern(path: str) -> re.Pattern[str]:
    """`/v1/chat/*` (prefix, any depth), `/v1/*/items` (`*` = one segment), `**` any depth.

    Matching ignores case and a trailing slash, so `/V1/Chat/` cannot dodge a rule written
    for `/v1/chat`; the path itself is already canonical (no `//`, `/./`, `%2e`).
    """
    body = path.rstrip("/") or "/"
    if body.endswith("/*"):
        prefix = body[:-2]
        return re.compile(_glob(prefix) + r"(?:/.*)?/?", re.IGNORECASE)
    suffix = "/?" if body != "/" else ""
    return re.compile(_glob(body) + suffix, re.IGNORECASE)


def _glob(text: str) -> str:
    parts = re.split(r"(\*\*|\*)", text)
    out = []
    for part in parts:
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(part))
    return "".join(out)


class RouteTable:
    """First matching route wins, in config order."""

    __slots__ = ("_seen", "routes")

    def __init__(self, configs: tuple[RouteConfig, ...]) -> None:
        self.routes = tuple(
            Route(
                name=config.name,
                config=config,
                pattern=compile_pattern(config.path),
                methods=frozenset(config.methods),
                scopes=frozenset(config.scopes),
            )
            for config in configs
        )

        # (method, path) -> its route, for the paths seen lately. Why: a regex per route per
        # request is the cost of routing, and clients repeat a few paths. Bounded, since the
        # paths are the clients' choice: emptied when full, rebuilt by the next requests.
        self._seen: dict[tuple[str, str], Route | None] = {}

    def match(self, method: str, path: str) -> Route | None:
        key = (method, path)
        seen = self._seen
        try:
            return seen[key]
        except KeyError:  # free when not raised: the common case pays one lookup
            pass
        route = next((r for r in self.routes if r.matches(method, path)), None)
        if len(path) <= _SEEN_PATH_MAX:
            if len(seen) >= _SEEN_MAX:
                seen.clear()
            seen[key] = route
        return route
