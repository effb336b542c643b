"""Removing a key from the query string leaves every other byte of the query alone."""

from __future__ import annotations

from shieldproxy.checks.api_key import strip_query_parameter


def test_only_the_key_parameter_is_removed_raw() -> None:
    query = "flag&a=%FF&api_key=sp_live_x&b=1+2&api%5Fkey=sp_live_y"
    assert strip_query_parameter(query, "api_key") == "flag&a=%FF&b=1+2"


def test_nothing_to_remove() -> None:
    assert strip_query_parameter("a=1&b", "api_key") == "a=1&b"
