"""RateLimit response headers (IETF draft fields plus the legacy X-RateLimit-* trio)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shieldproxy.limits.engine import Verdict
from shieldproxy.limits.model import Hit, LimitRule

# One enforced policy's numbers for one response: (quoted name, limit, remaining, seconds to reset).
PolicyState = tuple[str, int, int, float]


def _sf_string(value: str) -> str:
    # Structured-field string: quotes and backslashes escaped, nothing else allowed to break out.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _seconds(value: float) -> int:
    # Whole seconds rounded up, so a client that waits this long is never early.
    return max(0, math.ceil(value - 1e-9))


def rate_limit_headers(hits: Sequence[Hit], verdict: Verdict) -> list[tuple[str, str]]:
    """Headers for one response; shadow rules are not enforced, so they are not advertised."""
    policy: list[str] = []
    states: list[PolicyState] = []
    for hit, state in zip(hits, verdict.states, strict=True):
        rule = hit.rule
        if rule.shadow:
            continue
        name, window = rule_text(rule)
        policy.append(f"{name};q={state.limit}{window}")
        states.append((name, state.limit, state.remaining, state.reset_seconds))
    return headers_for(", ".join(policy), states, verdict.retry_after)


def policy_header(rules: Iterable[LimitRule]) -> str:
    """RateLimit-Policy for these rules at their configured limits (shadow rules left out)."""
    parts = []
    for rule in rules:
        if not rule.shadow:
            name, window = rule_text(rule)
            parts.append(f"{name};q={rule.ceiling}{window}")
    return ", ".join(parts)


def headers_for(
    policy: str, states: Iterable[PolicyState], retry_after: float | None
) -> list[tuple[str, str]]:
    """The fields of one response, given its RateLimit-Policy value and each policy's state.

    Runs on every limited response: whole seconds are rounded inline (see _seconds)."""
    ceil = math.ceil
    current: list[str] = []
    worst: PolicyState | None = None
    for state in states:
        name, _, remaining, reset = state
        t = ceil(reset - 1e-9)
        current.append(f"{name};r={remaining};t={t if t > 0 else 0}")
        # The legacy trio can describe one policy only: the one closest to denying.
        if worst is None or remaining < worst[2] or (remaining == worst[2] and reset > worst[3]):
            worst = state
    headers: list[tuple[str, str]] = []
    if worst is not None:
        t = ceil(worst[3] - 1e-9)
        headers += [
            ("RateLimit-Policy", policy),
            ("RateLimit", ", ".join(current)),
            ("X-RateLimit-Limit", str(worst[1])),
            ("X-RateLimit-Remaining", str(worst[2])),
            ("X-RateLimit-Reset", str(t if t > 0 else 0)),
        ]
    if retry_after is not None:
        headers.append(("Retry-After", str(max(1, _seconds(retry_after)))))
    return headers


# id(rule) -> (rule, quoted name, ";w=<window>"); the rule is kept so a recycled id never
# matches another rule. Rules are few (config, plans, keys' own), quota rules per period.
_parts: dict[int, tuple[LimitRule, str, str]] = {}


def rule_text(rule: LimitRule) -> tuple[str, str]:
    """(quoted policy name, ";w=<window>"), made once per rule: this runs on every response."""
    parts = _parts.get(id(rule))
    if parts is None or parts[0] is not rule:
        if len(_parts) >= 4096:
            _parts.clear()
        parts = _parts[id(rule)] = (
            rule,
            _sf_string(rule.name),
            f";w={_seconds(rule.window_seconds)}",
        )
    return parts[1], parts[2]
