"""canonical_path: one spelling per resource; ambiguous encodings refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shieldproxy.checks.request_target import BadTarget, canonical_path


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/v1/items", "/v1/items"),
        ("//v1//items", "/v1/items"),
        ("/v1/./items", "/v1/items"),
        ("/v1/items/.", "/v1/items/"),
        ("/v1/items/", "/v1/items/"),
        ("/v1/a/../items", "/v1/items"),
        ("/v1/a/b/../../items", "/v1/items"),
        ("/v1/a/..", "/v1/"),
        ("/a/..", "/"),
        ("/v1/%2e/items", "/v1/items"),
        ("/v1/%2E%2E/items", "/items"),
        ("/v1/.%2e/items", "/items"),
        ("/v1/it%65ms", "/v1/items"),
        ("/%7euser", "/~user"),
        ("/a%2db%5fc", "/a-b_c"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3Fb"),
        ("/...", "/..."),
        ("/.hidden/x", "/.hidden/x"),
    ],
)
def test_canonical_forms(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "v1/items",
        "*",
        "http://x/",
        "/a%2Fb",
        "/a%2fb",
        "/a%5Cb",
        "/a%5cb",
        "/a%00b",
        "/a%0d%0ab",
        "/a%7Fb",
        "/a\\b",
        "/..",
        "/../a",
        "/a/../..",
        "/%2e%2e/a",
        "/a/%2E%2E/%2e%2e/b",
        "/%",
        "/%2",
        "/%zz",
        "/a%g1",
        "/a#frag",
    ],
)
def test_ambiguous_targets_are_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        canonical_path(raw)


_SEGMENT = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "%2e",
            "%2E%2e",
            ".%2E",
            "a",
            "B",
            "%41",
            "%7e",
            "x.y",
            "%c3%a9",
            "-_~",
            "%20",
            "v1",
        ]
    ),
    st.text(alphabet="abcXYZ019-._~!$&'()*+,;=:@", min_size=1, max_size=6),
)
PATHS = st.lists(_SEGMENT, max_size=8).map(lambda parts: "/" + "/".join(parts))


@given(PATHS)
def test_canonical_path_is_idempotent_and_clean(raw: str) -> None:
    try:
        path = canonical_path(raw)
    except BadTarget:
        return
    assert canonical_path(path) == path
    assert path.startswith("/")
    assert "//" not in path
    segments = path.split("/")
    assert "." not in segments and ".." not in segments
    assert "%2e" not in path.lower()


@given(st.text(max_size=40).map(lambda text: "/" + text))
def test_canonical_path_never_raises_anything_but_bad_target(raw: str) -> None:
    try:
        path = canonical_path(raw)
    except BadTarget:
        return
    assert canonical_path(path) == path
    assert "//" not in path


def test_path_parameters_are_refused() -> None:
    """`/v1/admin;x/secret` is `/v1/admin/secret` to Tomcat/Spring: refuse, never guess."""
    with pytest.raises(BadTarget):
        canonical_path("/v1/admin;x/secret")
