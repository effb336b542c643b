"""The Decision value every check returns: allow, or deny with an HTTP answer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    """What a check concluded. A deny is a value, never an exception.

    `shadow` marks a deny that is only counted ("would deny") and lets the request through.
    """

    allowed: bool
    status: int = 200
    code: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    retry_after: int | None = None
    shadow: bool = False


ALLOW = Decision(allowed=True)
"""The one shared allow value: allowing costs no allocation."""


def deny(
    status: int,
    code: str,
    message: str,
    *,
    headers: tuple[tuple[str, str], ...] = (),
    retry_after: int | None = None,
) -> Decision:
    return Decision(
        allowed=False,
        status=status,
        code=code,
        message=message,
        headers=headers,
        retry_after=retry_after,
    )
