"""RateLimit response headers (IETF draft fields plus the legacy X-RateLimit-* trio)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from shieldproxy.limits.engine import LimitState, Verdict
from shieldproxy.limits.model import Hit, LimitRule


def _sf_string(value: str) -> str:
    # Structured-field string: quotes and backslashes escaped, nothing else allowed to break out.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> int:
    # Whole seconds rounded up, so a client that waits this long is never early.
    return max(0, math.ceil(value - 1e-9))


def rate_limit_headers(hits: Sequence[Hit], verdict: Verdict) -> list[tuple[str, str]]:
    """Headers for one response; shadow rules are not enforced, so they are not advertised.

    One pass over the hits, with each rule's constant text made once (this runs on every
    limited response).
    """
    policy: list[str] = []
    current: list[str] = []
    worst: LimitState | None = None
    for hit, state in zip(hits, verdict.states, strict=True):
        rule = hit.rule
        if rule.shadow:
            continue
        parts = _parts.get(id(rule))
        if parts is None or parts[0] is not rule:
            parts = _rule_parts(rule)
        name = parts[1]
        policy.append(f"{name};q={state.limit}{parts[2]}")
        reset = _seconds(state.reset_seconds)
        current.append(f"{name};r={state.remaining};t={reset}")
        # The legacy trio can describe one policy only: the one closest to denying.
        if worst is None or state.remaining < worst.remaining or (
            state.remaining == worst.remaining and state.reset_seconds > worst.reset_seconds
        ):
            worst = state
    headers: list[tuple[str, str]] = []
    if worst is not None:
        headers += [
            ("RateLimit-Policy", ", ".join(policy)),
            ("RateLimit", ", ".join(current)),
            ("X-RateLimit-Limit", str(worst.limit)),
            ("X-RateLimit-Remaining", str(worst.remaining)),
            ("X-RateLimit-Reset", str(_seconds(worst.reset_seconds))),
        ]
    if verdict.retry_after is not None:
        headers.append(("Retry-After", str(max(1, _seconds(verdict.retry_after)))))
    return headers


# id(rule) -> (rule, quoted name, ";w=<window>"); the rule is kept so a recycled id never
# matches another rule. Rules are few (config, plans, keys' own), quota rules per period.
_parts: dict[int, tuple[LimitRule, str, str]] = {}


def _rule_parts(rule: LimitRule) -> tuple[LimitRule, str, str]:
    if len(_parts) >= 4096:
        _parts.clear()
    parts = _parts[id(rule)] = (rule, _sf_string(rule.name), f";w={_seconds(rule.window_seconds)}")
    return parts
