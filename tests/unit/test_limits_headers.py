"""RateLimit headers from verdicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shieldproxy.limits import Hit, LimitRule, LimitState, Verdict, rate_limit_headers
from shieldproxy.limits.headers import ReserveFields, headers_for
from shieldproxy.limits.reserve import Reserve


def test_draft_and_legacy_headers() -> None:
    a = LimitRule("per-ip", "ip", "sliding_window", 100, 60)
    b = LimitRule('chat"key', "key", "token_bucket", 10, 1, burst=20)
    shadow = LimitRule("trial", "ip", "fixed_window", 1, 60, shadow=True)
    v = Verdict(
        False, "rate_limited",
        (LimitState("per-ip", 100, 40, 12.2, True, False),
         LimitState('chat"key', 20, 0, 0.05, False, False),
         LimitState("trial", 1, 0, 3, False, True)),
        1.0, False, None,
    )  # fmt: skip
    h = dict(rate_limit_headers([Hit(a, "ip"), Hit(b, "k"), Hit(shadow, "ip")], v))
    assert h["RateLimit-Policy"] == '"per-ip";q=100;w=60, "chat\\"key";q=20;w=1'
    assert h["RateLimit"] == '"per-ip";r=40;t=13, "chat\\"key";r=0;t=1'
    assert (h["X-RateLimit-Limit"], h["X-RateLimit-Remaining"], h["X-RateLimit-Reset"]) == (
        "20", "0", "1",
    )  # fmt: skip
    assert h["Retry-After"] == "1"


def test_no_rules_no_headers() -> None:
    assert rate_limit_headers([], Verdict(True, "", (), None, False, None)) == []


def test_quota_policy_window_is_the_period() -> None:
    month = 30 * 86_400
    q = LimitRule("quota", "key", "quota", 1000, month, period_end=1_700_000_000 + month)
    v = Verdict(
        False, "quota_exceeded", (LimitState("quota", 1000, 0, 3600.5, False, False, 1000),),
        3601.0, False, None,
    )  # fmt: skip
    h = dict(rate_limit_headers([Hit(q, "k@1700000000")], v))
    assert h["RateLimit-Policy"] == f'"quota";q=1000;w={month}'
    assert h["RateLimit"] == '"quota";r=0;t=3601'
    assert h["Retry-After"] == "3601"


_policy = st.tuples(
    st.sampled_from(['"a"', '"b"', '"per-ip"', '"x%d%%"']),
    st.integers(1, 10**9),  # limit
    st.integers(0, 10**9),  # remaining in the store
    st.integers(0, 50),  # units held
    st.floats(-5.0, 120.0, allow_nan=False),  # seconds to the reset
)


@given(st.lists(_policy, max_size=4), st.booleans())
def test_headers_from_reserves_are_the_generic_headers(
    policies: list[tuple[str, int, int, int, float]], legacy: bool
) -> None:
    """ReserveFields is headers_for() fused for the busiest path: the same fields to the
    character, as header lines, ties for the legacy trio included (equal remaining, then the
    later reset), whatever the names hold (a `%` is no printf directive)."""
    now = 1000.0
    reserves = [
        Reserve(base=base, left=left, reset_at=now + reset) for _, _, base, left, reset in policies
    ]
    shown = [(i, name, limit) for i, (name, limit, *_) in enumerate(policies)]
    states = [(name, limit, base + left, reset) for name, limit, base, left, reset in policies]
    policy = "P%d%%s"
    expected = headers_for(policy, states, None)
    if not legacy:
        expected = expected[:2]
    if not policies:
        return  # nothing enforced: no fields (a lane builds no ReserveFields then)
    fields = ReserveFields(policy, shown, legacy)
    lines = fields.render(reserves, now, epoch=0)
    assert lines == "".join(f"{name}: {value}\r\n" for name, value in expected)
    assert fields.count == len(expected)


# One step of a lane's life between two responses: time passes, the reserves are spent, and
# now and then a grant moves a reserve's reset.
_step = st.tuples(
    st.floats(0.0, 2.5, allow_nan=False),  # seconds since the previous response
    st.integers(0, 3),  # units spent from each reserve
    st.one_of(st.none(), st.tuples(st.integers(0, 3), st.floats(-1.0, 90.0, allow_nan=False))),
)


@given(
    st.lists(_policy, min_size=1, max_size=4),
    st.lists(_step, min_size=1, max_size=40),
    st.booleans(),
)
def test_fields_rendered_over_time_are_the_generic_headers(
    policies: list[tuple[str, int, int, int, float]],
    steps: list[tuple[float, int, tuple[int, float] | None]],
    legacy: bool,
) -> None:
    """What ReserveFields lays out once (the seconds to each reset) must never be stale:
    response after response, as time passes and grants move resets, its lines are
    headers_for()'s, at every whole second and at the instants a second ticks over. The
    resets are read again only when the epoch says one moved."""
    now = 1000.0
    reserves = [
        Reserve(base=base, left=left + 10, reset_at=now + reset)
        for _, _, base, left, reset in policies
    ]
    shown = [(i, name, limit) for i, (name, limit, *_) in enumerate(policies)]
    fields = ReserveFields("P", shown, legacy)
    epoch = 0  # as Reservations.epoch: bumped whenever a reset moves, and only then
    for elapsed, spent, moved in steps:
        now += elapsed
        for r in reserves:
            r.left = max(0, r.left - spent)
        if moved is not None:
            index, reset = moved
            reserves[index % len(reserves)].reset_at = now + reset
            epoch += 1
        # Now, then around the instant each policy's seconds next tick over: a microsecond
        # before, and at it (the limiter's clock never goes back).
        ticks = [now + (r.reset_at - now) % 1.0 for r in reserves]
        for at in sorted({now, *ticks, *(max(now, t - 1e-6) for t in ticks)}):
            states = [
                (name, limit, r.base + r.left, r.reset_at - at)
                for (name, limit, *_), r in zip(policies, reserves, strict=True)
            ]
            expected = headers_for("P", states, None)[: fields.count]
            lines = "".join(f"{name}: {value}\r\n" for name, value in expected)
            assert fields.render(reserves, at, epoch) == lines, (at, [r.reset_at for r in reserves])
            now = at


def test_an_earlier_clock_reading_is_rendered_as_it_is() -> None:
    """The limiter's clock is monotonic; a renderer handed an earlier `now` all the same
    (another clock injected) shows that instant's seconds, not the later ones it laid out."""
    reserve = Reserve(base=90, left=5, reset_at=100.0)
    fields = ReserveFields('"p"', [(0, '"p"', 100)], legacy=False)
    assert (
        fields.render([reserve], 97.5, 0) == 'RateLimit-Policy: "p"\r\nRateLimit: "p";r=95;t=3\r\n'
    )
    assert (
        fields.render([reserve], 96.5, 0) == 'RateLimit-Policy: "p"\r\nRateLimit: "p";r=95;t=4\r\n'
    )


def test_fields_from_unprintable_names_are_never_rendered() -> None:
    """The rendered lines reach the wire unchecked: a name that could break a line (no rule
    name can, config refuses them) is refused when the renderer is made, not sent."""
    with pytest.raises(ValueError, match="printable"):
        ReserveFields('"a"\r\nX-Forged: 1', [(0, '"a"', 10)], legacy=True)
    with pytest.raises(ValueError, match="printable"):
        ReserveFields('"a"', [(0, '"a\x01"', 10)], legacy=False)
