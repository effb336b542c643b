"""Refuse unsafe methods and target forms; compute the one canonical path."""

from __future__ import annotations

import re

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_FORBIDDEN_ESCAPES = frozenset(b"/\\\x00")
_HEX = re.compile(r"%([0-9A-Fa-f]{2})")
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE", "TRACK"})


class BadTarget(ValueError):
    """The request target is ambiguous or malformed."""


def canonical_path(raw_path: str) -> str:
    """One spelling per resource: dots resolved, `//` collapsed, unreserved escapes decoded.

    Route matching and forwarding both use this path, so `/v1//chat`, `/v1/./chat`,
    `/v1/%63hat` and `/v1/x/../chat` are the same request to every check and to the
    upstream. Encodings that different servers read differently (`%2F`, `%5C`, `%00`,
    a backslash, `..` above the root, broken escapes) are refused rather than guessed.
    """
    if not raw_path.startswith("/"):
        raise BadTarget("the request target must be a path starting with '/'")
    if "\\" in raw_path:
        raise BadTarget("backslash in path")
    if ";" in raw_path:
        # Path parameters (`/admin;x/secret`) are dropped by some servers (Tomcat, Spring):
        # routing here and there would see different paths.
        raise BadTarget("';' path parameters are not accepted")
    if "#" in raw_path:
        # A fragment never belongs in a request target; servers disagree on whether
        # `/admin#x` is `/admin`, so a route written for `/admin` could be dodged.
        raise BadTarget("fragment in request target")
    if "%" in raw_path:
        raw_path = _decode_unreserved(raw_path)
    if "//" not in raw_path and "/." not in raw_path:
        return raw_path
    segments = raw_path.split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise BadTarget("'..' above the root")
            out.pop()
        else:
            out.append(segment)
    trailing = segments[-1] in ("", ".", "..") and len(segments) > 2
    path = "/" + "/".join(out)
    return path + "/" if trailing and out else path


def _decode_unreserved(path: str) -> str:
    if path.count("%") != len(_HEX.findall(path)):
        raise BadTarget("invalid percent-escape")

    def replace(match: re.Match[str]) -> str:
        byte = int(match.group(1), 16)
        if byte in _FORBIDDEN_ESCAPES or byte < 0x20 or byte == 0x7F:
            raise BadTarget(f"encoded {match.group(0)!r} in path")
        if byte in _UNRESERVED:
            return chr(byte)
        return match.group(0).upper()

    return _HEX.sub(replace, path)


class RequestTargetCheck:
    name = "request_target"

    def decide(self, ctx: RequestContext) -> Decision:
        request = ctx.request
        if request.method in _REFUSED_METHODS:
            return deny(405, "method_not_allowed", f"{request.method} is not proxied")
        raw_path, _, query = request.raw_path.partition("?")
        try:
            ctx.path = canonical_path(raw_path)
        except BadTarget as exc:
            return deny(400, "bad_request", f"malformed request target: {exc}")
        if "#" in query:
            return deny(400, "bad_request", "malformed request target: fragment in query")
        ctx.query = query
        return ALLOW
