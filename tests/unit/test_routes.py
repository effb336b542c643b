"""RouteTable.match: the first matching route, remembered per (method, path)."""

from __future__ import annotations

import pytest

from shieldproxy import routes
from shieldproxy.config import RouteConfig
from shieldproxy.routes import RouteTable


def table() -> RouteTable:
    return RouteTable(
        (
            RouteConfig(name="writes", path="/v1/items/*", methods=("POST",)),
            RouteConfig(name="items", path="/v1/items/*"),
            RouteConfig(name="chat", path="/v1/*/chat"),
        )
    )


def names(t: RouteTable, method: str, path: str) -> str | None:
    route = t.match(method, path)
    return route.name if route is not None else None


def test_a_remembered_answer_is_the_one_matching_gave() -> None:
    t = table()
    cases = [
        ("POST", "/v1/items/7", "writes"),
        ("GET", "/v1/items/7", "items"),
        ("GET", "/V1/Items/7/", "items"),
        ("GET", "/v1/x/chat", "chat"),
        ("GET", "/v1/x/y/chat", None),
        ("DELETE", "/nowhere", None),
    ]
    for _ in range(2):  # first matched, then remembered
        assert [names(t, m, p) for m, p, _ in cases] == [want for _, _, want in cases]


def test_what_is_remembered_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "_SEEN_MAX", 8)
    t = table()
    for n in range(100):  # a client choosing a new path each time
        assert names(t, "GET", f"/v1/items/{n}") == "items"
        assert len(t._seen) <= 8


def test_long_paths_are_matched_but_not_remembered() -> None:
    t = table()
    long = "/v1/items/" + "x" * routes._SEEN_PATH_MAX
    assert names(t, "GET", long) == "items"
    assert not t._seen
