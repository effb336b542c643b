"""RateLimit response headers (IETF draft fields plus the legacy X-RateLimit-* trio)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from shieldproxy.limits.engine import LimitState, Verdict
from shieldproxy.limits.model import Hit


def _sf_string(value: str) -> str:
    # Structured-field string: quotes and backslashes escaped, nothing else allowed to break out.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> int:
    # Whole seconds rounded up, so a client that waits this long is never early.
    return max(0, math.ceil(value - 1e-9))


def rate_limit_headers(hits: Sequence[Hit], verdict: Verdict) -> list[tuple[str, str]]:
    """Headers for one response; shadow rules are not enforced, so they are not advertised."""
    shown: list[tuple[Hit, LimitState]] = [
        (h, s) for h, s in zip(hits, verdict.states, strict=True) if not h.rule.shadow
    ]
    headers: list[tuple[str, str]] = []
    if shown:
        policy = ", ".join(
            f"{_sf_string(s.name)};q={s.limit};w={_seconds(h.rule.window_seconds)}"
            for h, s in shown
        )
        current = ", ".join(
            f"{_sf_string(s.name)};r={s.remaining};t={_seconds(s.reset_seconds)}" for _, s in shown
        )
        # The legacy trio can describe one policy only: the one closest to denying.
        _, worst = min(shown, key=lambda hs: (hs[1].remaining, -hs[1].reset_seconds))
        headers += [
            ("RateLimit-Policy", policy),
            ("RateLimit", current),
            ("X-RateLimit-Limit", str(worst.limit)),
            ("X-RateLimit-Remaining", str(worst.remaining)),
            ("X-RateLimit-Reset", str(_seconds(worst.reset_seconds))),
        ]
    if verdict.retry_after is not None:
        headers.append(("Retry-After", str(max(1, _seconds(verdict.retry_after)))))
    return headers
