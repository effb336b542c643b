"""RateLimit response headers (IETF draft fields plus the legacy X-RateLimit-* trio)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from shieldproxy.limits.engine import Verdict
from shieldproxy.limits.model import Hit, LimitRule
from shieldproxy.limits.reserve import Reserve

# One enforced policy's numbers for one response: (quoted name, limit, remaining, seconds to reset).
PolicyState = tuple[str, int, int, float]


_PRINTABLE = re.compile(r"[\x20-\x7e]*")


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
    state is its reserve's, rendered as header lines by one f-string.

    Why: the busiest subjects' requests all come this way, and their fields differ from one
    response to the next only in the remaining counts. Everything else (names, limits, the
    seconds to each reset, which change once a second) is laid out as the text between those
    numbers when it changes ("baked"); a response then costs reading its reserves and joining
    a few strings. The resets are not even read while the reserves' epoch
    (Reservations.epoch, bumped whenever a reset moves) is the one last seen.

    One, two or three policies with the legacy trio, the common shapes, each have their own
    f-string: a printf template of the same lines cost twice as many instructions (`%`
    scans every character of its template), a loop over the numbers a fifth more. Other
    shapes join their pieces in a loop.
    """

    __slots__ = (
        "_baked",
        "_baked_at",
        "_epoch",
        "_fresh_until",
        "_head",
        "_indices",
        "_legacy",
        "_limits",
        "_names",
        "_order",
        "_pieces",
        "_shape",
        "count",
    )

    def __init__(self, policy: str, shown: Sequence[tuple[int, str, int]], legacy: bool) -> None:
        """`shown`: (reserve index, quoted policy name, limit) of each enforced policy, in order;
        at least one (with none enforced a response has no fields to render)."""
        assert shown, "no enforced policy: nothing to render"
        # The lines go out unchecked (context.RequestContext.response_fields): what they are
        # made of must be printable. Rule names are (config allows [A-Za-z0-9_.-]; key and
        # plan rules have fixed names), and the numbers are ints.
        if not all(_PRINTABLE.fullmatch(text) for text in (policy, *(n for _, n, _ in shown))):
            raise ValueError(f"policy text that is not printable ASCII: {policy!r}")
        self._legacy = legacy
        self._head = f"RateLimit-Policy: {policy}\r\nRateLimit: "
        self._names = tuple(name for _, name, _ in shown)
        self._limits = tuple(limit for _, _, limit in shown)
        self._indices = tuple(i for i, _, _ in shown)
        self.count = 5 if legacy else 2
        # Which f-string render() uses: the number of policies (1-3) with the legacy trio,
        # else 0 (the loop).
        self._shape = len(shown) if legacy and len(shown) <= 3 else 0
        # Set by _bake (the first render bakes): (reserve index, its reset_at) per policy, the
        # text around the numbers (one tuple per policy the legacy trio may describe, the
        # remaining counts go between its pieces, then the trio's) and the order that picks
        # among them.
        self._baked: tuple[tuple[int, float], ...] = tuple((i, math.nan) for i, _, _ in shown)
        self._pieces: tuple[tuple[str, ...], ...] = ()
        self._order: tuple[int, ...] = ()
        # Limiter clock: the pieces hold from _baked_at until the first second ticks over.
        # The limiter's clock is monotonic; an earlier `now` bakes again all the same.
        self._baked_at = math.inf
        self._fresh_until = -math.inf
        self._epoch = -1  # the reserves' epoch the resets were last read in (-1: never)

    def render(self, reserves: Sequence[Reserve], now: float, epoch: int) -> str:
        """The header lines ("Name: value\\r\\n" each, `count` of them) for these reserves;
        `epoch` is their Reservations.epoch (any change of it means a reset may have moved)."""
        if epoch != self._epoch or not self._baked_at <= now < self._fresh_until:
            self._lay_out(reserves, now, epoch)
        # The legacy trio describes the policy closest to denying: the least remaining, and of
        # those the latest reset (_order lists the policies by reset, latest first).
        shape = self._shape
        if shape == 3:
            i, j, k = self._indices
            r = reserves[i]
            a = r.base + r.left
            r = reserves[j]
            b = r.base + r.left
            r = reserves[k]
            c = r.base + r.left
            low = a if a < b else b  # not min(): its keyword parsing costs more than this
            low = c if c < low else low
            lefts = (a, b, c)
            for m in self._order:
                if lefts[m] == low:
                    p = self._pieces[m]
                    return f"{p[0]}{a}{p[1]}{b}{p[2]}{c}{p[3]}{low}{p[4]}"
        elif shape == 2:
            i, j = self._indices
            r = reserves[i]
            a = r.base + r.left
            r = reserves[j]
            b = r.base + r.left
            p = self._pieces[(0 if a < b else 1) if a != b else self._order[0]]
            low = a if a < b else b
            return f"{p[0]}{a}{p[1]}{b}{p[2]}{low}{p[3]}"
        elif shape == 1:
            r = reserves[self._indices[0]]
            a = r.base + r.left
            p = self._pieces[0]
            return f"{p[0]}{a}{p[1]}{a}{p[2]}"
        return self._render_any(reserves)

    def _render_any(self, reserves: Sequence[Reserve]) -> str:
        """render() for the other shapes: four policies or more, or no legacy trio."""
        lefts = []
        for i in self._indices:
            r = reserves[i]
            lefts.append(r.base + r.left)
        pieces = self._pieces[0]
        if self._legacy:
            low = min(lefts)
            pieces = self._pieces[next(m for m in self._order if lefts[m] == low)]
            lefts.append(low)
        out = [pieces[0]]
        for left, text in zip(lefts, pieces[1:], strict=True):
            out += (str(left), text)
        return "".join(out)

    def _lay_out(self, reserves: Sequence[Reserve], now: float, epoch: int) -> None:
        """Bake again if a second ticked (or time went back) or a grant moved a reset."""
        if self._baked_at <= now < self._fresh_until and all(
            reserves[i].reset_at == reset_at for i, reset_at in self._baked
        ):
            self._epoch = epoch
            return
        self._bake(reserves, now)
        self._epoch = epoch

    def _bake(self, reserves: Sequence[Reserve], now: float) -> None:
        """Lay the pieces out for the seconds to each reset as of `now`."""
        baked = []
        seconds = []
        fresh_until = math.inf
        for i, _ in self._baked:
            reset_at = reserves[i].reset_at
            reset = reset_at - now
            t = math.ceil(reset - 1e-9) if reset > 0 else 0  # as _seconds()
            if t > 0:  # t drops by one when reset - 1e-9 reaches t - 1 (a microsecond early)
                fresh_until = min(fresh_until, reset_at - 1e-9 - (t - 1) - 1e-6)
            baked.append((i, reset_at))
            seconds.append(t)
        # The text before each remaining count, and after the last one.
        texts = [f"{self._head}{self._names[0]};r="]
        for name, t in zip(self._names[1:], seconds, strict=False):
            texts.append(f";t={t}, {name};r=")
        if self._legacy:
            self._pieces = tuple(
                (
                    *texts,
                    f";t={seconds[-1]}\r\nX-RateLimit-Limit: {limit}\r\nX-RateLimit-Remaining: ",
                    f"\r\nX-RateLimit-Reset: {t}\r\n",
                )
                for limit, t in zip(self._limits, seconds, strict=True)
            )
            self._order = tuple(sorted(range(len(baked)), key=lambda k: -baked[k][1]))
        else:
            self._pieces = ((*texts, f";t={seconds[-1]}\r\n"),)
        self._baked = tuple(baked)
        self._baked_at = now
        self._fresh_until = fresh_until


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
