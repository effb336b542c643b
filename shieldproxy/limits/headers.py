"""RateLimit response headers (IETF draft fields plus the legacy X-RateLimit-* trio)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from shieldproxy.limits.engine import Verdict
from shieldproxy.limits.model import Hit, LimitRule
from shieldproxy.limits.reserve import Reserve

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


class ReserveFields:
    """headers_for() of the requests of one shape admitted from reserves, where each policy's
    state is its reserve's, rendered as header lines in one formatting operation.

    Why: the busiest subjects' requests all come this way, and their fields differ from one
    response to the next only in numbers. The lines around the numbers are laid out once per
    shape, as a printf template; a response then costs the numbers and one `%`, instead of a
    string per policy, a pair per field and a second pass turning the pairs into lines.
    """

    __slots__ = ("_legacy", "_shown", "_template", "count")

    def __init__(self, policy: str, shown: Sequence[tuple[int, str, int]], legacy: bool) -> None:
        """`shown`: (reserve index, quoted policy name, limit) of each enforced policy, in order;
        at least one (with none enforced a response has no fields to render)."""
        assert shown, "no enforced policy: nothing to render"
        self._legacy = legacy
        self._shown = tuple((i, limit) for i, _, limit in shown)
        current = ", ".join(f"{_printf(name)};r=%d;t=%d" for _, name, _ in shown)
        template = f"RateLimit-Policy: {_printf(policy)}\r\nRateLimit: {current}\r\n"
        self.count = 2
        if legacy:
            template += (
                "X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
            )
            self.count = 5
        self._template = template

    def render(self, reserves: Sequence[Reserve], now: float) -> str:
        """The header lines ("Name: value\\r\\n" each, `count` of them) for these reserves."""
        values: list[int] = []
        worst_limit = worst_left = worst_t = 0
        worst_reset: float | None = None
        for i, limit in self._shown:
            r = reserves[i]
            left = r.base + r.left
            reset = r.reset_at - now
            t = math.ceil(reset - 1e-9) if reset > 0 else 0  # as _seconds(), inline
            values += (left, t)
            # The legacy trio can describe one policy only: the one closest to denying.
            if (
                worst_reset is None
                or left < worst_left
                or (left == worst_left and reset > worst_reset)
            ):
                worst_limit, worst_left, worst_t, worst_reset = limit, left, t, reset
        if self._legacy:
            values += (worst_limit, worst_left, worst_t)
        return self._template % tuple(values)


def _printf(text: str) -> str:
    # Literal text inside a printf template.
    return text.replace("%", "%%")


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
