"""Faults (not denials) and the one place they become HTTP answers.

    ShieldError
    ├── UpstreamError               the upstream failed us
    │   ├── UpstreamUnavailable     refused, reset or closed before answering  → 502
    │   ├── UpstreamTimeout         no connection / no response bytes in time  → 504
    │   └── UpstreamBadResponse     the response could not be parsed           → 502
    └── ClientBodyError             the client's body broke the rules mid-stream
        ├── BodyTooLarge            more bytes than server.max_body_bytes      → 413
        ├── BodyTimeout             silence inside the body                    → 408
        └── BodyIncomplete          the client went away mid-body              → 400

Denials are `Decision` values; these exceptions mean something broke.
"""

from __future__ import annotations

from shieldproxy.decision import Decision, deny


class ShieldError(Exception):
    """Base of every fault shieldproxy raises on purpose."""

    kind = "error"


class UpstreamError(ShieldError):
    kind = "upstream"


class UpstreamUnavailable(UpstreamError):
    def __init__(self, message: str, kind: str = "reset") -> None:
        super().__init__(message)
        self.kind = kind


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str, kind: str = "read_timeout") -> None:
        super().__init__(message)
        self.kind = kind


class UpstreamBadResponse(UpstreamError):
    kind = "bad_response"


class ClientBodyError(ShieldError):
    kind = "client_body"


class BodyTooLarge(ClientBodyError):
    kind = "body_too_large"


class BodyTimeout(ClientBodyError):
    kind = "body_timeout"


class BodyIncomplete(ClientBodyError):
    kind = "body_incomplete"


def fault_decision(exc: ShieldError) -> Decision:
    """The HTTP answer for a fault; the only place faults map to statuses."""
    match exc:
        case UpstreamTimeout():
            return deny(504, "upstream_timeout", "the upstream did not answer in time")
        case UpstreamBadResponse():
            return deny(502, "upstream_bad_response", "the upstream sent a malformed response")
        case UpstreamError():
            return deny(502, "upstream_unavailable", "the upstream is unavailable")
        case BodyTooLarge():
            return deny(413, "body_too_large", str(exc))
        case BodyTimeout():
            return deny(408, "request_timeout", "the request body arrived too slowly")
        case _:
            return deny(400, "bad_request", "the request body was incomplete")
