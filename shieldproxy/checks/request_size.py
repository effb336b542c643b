"""Bound header size/count (431) and the declared body size (413) before any work."""

from __future__ import annotations

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny


class RequestSizeCheck:
    """The parser already caps each line; this caps the total and the declared body.

    A chunked body has no declared size: the forwarder counts it while streaming.
    """

    name = "request_size"

    def __init__(self, max_header_bytes: int, max_header_count: int, max_body_bytes: int) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_header_count = max_header_count
        self._max_body_bytes = max_body_bytes

    def decide(self, ctx: RequestContext) -> Decision:
        raw_headers = ctx.request.raw_headers
        if len(raw_headers) > self._max_header_count:
            return deny(431, "headers_too_large", "too many request headers")
        size = 0
        for name, value in raw_headers:
            size += len(name) + len(value) + 4
        if size > self._max_header_bytes:
            return deny(431, "headers_too_large", "request headers are too large")
        declared = ctx.request.content_length
        if self._max_body_bytes and declared is not None and declared > self._max_body_bytes:
            return deny(
                413,
                "body_too_large",
                f"request body exceeds {self._max_body_bytes} bytes",
            )
        return ALLOW
