"""Pipeline.run and begin: checks in order, awaited only when they return an awaitable."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine

from aiohttp.test_utils import make_mocked_request

from shieldproxy.context import RequestContext
from shieldproxy.decision import ALLOW, Decision, deny
from shieldproxy.pipeline import PendingRun, Pipeline

SHADOW = Decision(allowed=False, shadow=True, status=429, code="rate_limited")
DENY = deny(403, "insufficient_scope", "no")


class Step:
    """A check answering `decision`, at once or after a suspension (`waits`)."""

    def __init__(self, name: str, decision: Decision, seen: list[str], *, waits: bool) -> None:
        self.name, self._decision, self._seen, self._waits = name, decision, seen, waits

    def decide(self, ctx: RequestContext) -> Decision | Awaitable[Decision]:
        self._seen.append(self.name)
        return self._later() if self._waits else self._decision

    async def _later(self) -> Decision:
        return self._decision


async def run(*steps: tuple[Decision, bool]) -> tuple[Decision, list[str], RequestContext]:
    seen: list[str] = []
    checks = [Step(f"c{i}", d, seen, waits=w) for i, (d, w) in enumerate(steps)]
    ctx = RequestContext(make_mocked_request("GET", "/"), "r-1", 0.0)
    return await Pipeline(checks).run(ctx), seen, ctx


async def test_every_check_runs_in_order_and_the_first_deny_answers() -> None:
    for waits in (False, True):
        decision, seen, _ = await run((ALLOW, waits), (DENY, waits), (ALLOW, waits))
        assert decision is DENY and seen == ["c0", "c1"]


async def test_awaited_and_immediate_answers_mix() -> None:
    decision, seen, ctx = await run((ALLOW, True), (SHADOW, False), (SHADOW, True), (ALLOW, False))
    assert decision is ALLOW and seen == ["c0", "c1", "c2", "c3"]
    assert ctx.shadow_denials == [SHADOW, SHADOW]  # recorded, passed over


async def test_begin_stops_at_the_first_check_that_waits_and_the_rest_runs_when_awaited() -> None:
    seen: list[str] = []
    checks = [
        Step("c0", SHADOW, seen, waits=False),
        Step("c1", ALLOW, seen, waits=True),
        Step("c2", SHADOW, seen, waits=False),
        Step("c3", DENY, seen, waits=True),
    ]
    ctx = RequestContext(make_mocked_request("GET", "/"), "r-1", 0.0)
    pending = Pipeline(checks).begin(ctx)
    assert isinstance(pending, PendingRun) and seen == ["c0", "c1"]
    assert await pending is DENY and seen == ["c0", "c1", "c2", "c3"]
    assert ctx.shadow_denials == [SHADOW, SHADOW]


async def test_begin_answers_at_once_when_no_check_waits() -> None:
    seen: list[str] = []
    checks = [Step("c0", ALLOW, seen, waits=False), Step("c1", DENY, seen, waits=False)]
    ctx = RequestContext(make_mocked_request("GET", "/"), "r-1", 0.0)
    assert Pipeline(checks).begin(ctx) is DENY


def test_a_pending_run_never_awaited_closes_the_waiting_check() -> None:
    """Its client went before the run was awaited: the check's coroutine is closed, not left
    to be collected unawaited (a RuntimeWarning, an error under this suite's settings)."""
    seen: list[str] = []
    waiting = Step("c0", ALLOW, seen, waits=True)
    ctx = RequestContext(make_mocked_request("GET", "/"), "r-1", 0.0)
    pending = Pipeline([waiting, Step("c1", DENY, seen, waits=False)]).begin(ctx)
    assert isinstance(pending, PendingRun)
    coroutine = pending._pending
    assert isinstance(coroutine, Coroutine)
    pending.close()
    assert coroutine.cr_frame is None  # closed
    assert seen == ["c0"]
