"""Units reserved ahead from the store and spent locally: a busy subject costs no round trip
per request, yet the store still counts every unit before it is spent.

Why: one store call per request costs tens of microseconds of Python even when coalesced
(building the call, a future, a loop wake-up, decoding), more than the rest of a proxied
request. Envoy and Kong answer that by counting locally and syncing later, which over-admits
between syncs. Here the order is reversed: when a subject is busy, the store call that admits a
request also consumes enough units to hold `rate x horizon` of them (never more than
1/GRANT_SHARE of what is left per call, see limits.lua), and this instance spends them on the
subject's next requests without asking. Units are consumed in the store before they are spent,
so a limit is never exceeded; what an instance still holds when its reservation expires (after
`horizon`, or at the end of the window) goes back to the store ("refund", within half a horizon
more). A reserve running low (half of what it held after its last grant spent, or half of its
time gone) is topped up by a cost-0 store call in the background (see refill), so a steady
subject's requests seldom find it empty: it asks twice per horizon and holds between half a
horizon and a horizon of its traffic. (It once asked for a whole horizon's worth at every
refill, four times per horizon: a busy subject's holding grew without bound.) The price is an
under-admission: units one instance holds are not available to another until they are spent or
given back, and an instance denied meanwhile caches that denial (see cache.py) until the window
ends. Both are bounded by one horizon of the subject's traffic on that instance.

Only counters can be reserved (RESERVABLE): sliding_log stays exact per request by contract,
concurrency slots belong to one request each; a request with any such limit goes to the store
whole, and reserves nothing. A subject seen for the first time (or again after a quiet second),
or at a rate below one unit per horizon, is never reserved for: quiet subjects keep exact
per-request answers. Nor are limits below `min_limit` (default 1,000 per window): they admit so
few requests that a round trip each costs little, and there a unit held by the wrong instance
at the end of a burst would be a visible share of the limit.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from shieldproxy.limits.model import Hit
from shieldproxy.store.base import RESERVABLE, CallResult, LimitCall

# A rate estimate older than this starts over: a subject idle for a while is not busy.
_RATE_WINDOW_S = 1.0
# Rates are measured over at least this long, so two requests a microsecond apart do not
# look like a million per second.
_MIN_ELAPSED_S = 0.005
# Ends of windows the reservation cannot outlive (their counts belong to that window).
_WINDOWED = frozenset({"fixed_window", "sliding_window", "quota"})

# take_from()'s answers.
NOT_TAKEN, TAKEN, TAKEN_LOW = 0, 1, 2

GiveBack = tuple[LimitCall, int]  # (call whose cost is the units to return, window stamp)


@dataclass(slots=True, eq=False)
class Reserve:
    """What this instance holds for one limiter key."""

    call: LimitCall | None = None  # the call that was granted (key, strategy, numbers)
    left: int = 0  # reserved units not spent yet
    limit: int = 0  # the limit they were granted under
    base: int = 0  # remaining in the store after the grant, reserved units excluded
    used: int = 0  # quota only: the store's count after the grant (reserved units included)
    stamp: int = 0  # window the units were counted in (for the refund)
    reset_at: float = 0.0  # limiter clock: when the store's window or period resets
    valid_until: float = 0.0  # limiter clock: spend before this, then give back
    # The rate estimate: units asked for since `since` are `demand` (through the store, see
    # wants) plus `left_at_since - left` (spent from here). `left_at_since` is `left` as of
    # `since`, moved with every change of `left` that is not a spend (a grant, a give-back),
    # so a spend, which every busy request makes, touches nothing but `left`.
    demand: int = 0
    left_at_since: int = 0
    since: float = 0.0
    asking: bool = False  # a store call asking for more is in flight
    full: int = 0  # units held right after the last grant: fewer than half of them is low
    capped: bool = False  # valid_until is the window's end, not the horizon's
    # take_from()'s tests folded into two numbers (see Reservations._mark): spending that
    # leaves at least `floor` units before `quick_until` is taken, and finds nothing low.
    # The defaults send every spend through the full tests.
    floor: int = 0
    quick_until: float = -math.inf


# One hit's spend: (its reserve, its cost, the limit its units must have been granted under).
# Kept ready per request shape (HitSet.spends): a spend then unpacks one tuple per reserve.
Spend = tuple[Reserve, int, int]


class Reservations:
    """Per-key reserves of one limiter. Single-threaded (one event loop), no awaits inside."""

    def __init__(
        self, *, horizon_seconds: float, max_units: int, max_entries: int, min_limit: int = 1
    ) -> None:
        self._horizon = horizon_seconds
        # A store reply can take tens of milliseconds when this process is saturated (several
        # loop turns of queued requests): refill() asks while half of the units and of the
        # time are left, so the top-up lands long before the reserve runs out.
        self._early = horizon_seconds / 2
        self._min_limit = min_limit
        self._max_units = max_units
        self._max_entries = max_entries
        self._entries: dict[str, Reserve] = {}
        self._expiry: list[tuple[float, int, Reserve]] = []  # heap by valid_until
        self._seq = itertools.count()
        self._owed: list[GiveBack] = []  # leftovers replaced or evicted, to give back
        # Bumped whenever a reserve's reset_at moves: what was laid out from the resets
        # (limits.headers.ReserveFields) holds while it stays the same.
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, key: str, now: float, limit: int | None = None) -> int:
        """Units reserved for `key` and not spent yet (under `limit`, when given)."""
        r = self._entries.get(key)
        if r is None or now >= r.valid_until or (limit is not None and r.limit != limit):
            return 0
        return r.left

    def take(
        self, needs: Sequence[tuple[int, int]], keys: Sequence[str], now: float
    ) -> list[Reserve] | None:
        """Spend reserved units for every hit, or touch nothing and return None.

        `needs` holds each hit's (cost, limit): see HitSet.needs."""
        found = self.lookup(keys)
        if found is None or not self.take_from(spends_of(found, needs), now):
            return None
        return found

    def take_from(self, spends: Sequence[Spend], now: float) -> int:
        """take() for reserves already looked up (see lookup, spends_of): spend for every
        hit, or none.

        NOT_TAKEN, TAKEN, or TAKEN_LOW when one of the reserves now runs low and refill()
        would ask for more. Costs must be >= 1 (a cost-0 hit is never admitted from here).
        The reserves must be distinct, as the keys of a HitSet that has reserves are (two
        hits on one key are merged before they reach reserves).

        Every busy request runs this, and seldom meets anything but plenty: one test per
        reserve (the marks _mark keeps) spends; anything else undoes and goes to _take."""
        for r, cost, limit in spends:
            left = r.left - cost
            if left < r.floor or now >= r.quick_until or r.limit != limit:
                _undo(spends, r)
                return self._take(spends, now)
            r.left = left
        return TAKEN

    def _take(self, spends: Sequence[Spend], now: float) -> int:
        """take_from() in full: short, expired or granted under another limit, or low."""
        taken = TAKEN
        for r, cost, limit in spends:
            left = r.left - cost
            if left < 0 or now >= r.valid_until or r.limit != limit:
                _undo(spends, r)  # an evicted reserve has nothing left: it fails here too
                return NOT_TAKEN
            r.left = left
            if self._low(r, now):
                taken = TAKEN_LOW
        return taken

    def _low(self, r: Reserve, now: float) -> bool:
        """Worth topping up (unless already asking): half of what it held after its last
        grant is spent, or half of its time has passed. Time runs out at a window's end
        whatever is asked: a capped reserve is low by its units only."""
        return not r.asking and (
            2 * r.left < r.full or not (r.capped or now < r.valid_until - self._early)
        )

    def _mark(self, r: Reserve) -> None:
        """Fold _take's tests for `r` into its floor and quick_until, after anything they read
        changed (asking, full, capped, valid_until): above the floor and before quick_until,
        a spend is taken and finds nothing low (2 * left >= full, and time not running out),
        or, while asking, simply taken."""
        if r.asking:
            r.floor, r.quick_until = 0, r.valid_until
        else:
            r.floor = (r.full + 1) // 2  # the least left with 2 * left >= full
            r.quick_until = r.valid_until if r.capped else r.valid_until - self._early

    def lookup(self, keys: Sequence[str]) -> list[Reserve] | None:
        """The reserves of these keys, if every one has an entry (for take_from)."""
        entries = self._entries
        found = [entries.get(k) for k in keys]
        return None if None in found else found  # type: ignore[return-value]

    def wants(self, hits: Sequence[Hit], keys: Sequence[str], now: float) -> list[int]:
        """Units to ask for beyond each hit's cost in the store call about to be made."""
        floor = self._min_limit
        if not all(
            h.cost >= 1 and h.rule.strategy in RESERVABLE and h.rule.requests >= floor for h in hits
        ):
            # Such requests can never be served from reserves (take() needs one for every
            # hit), so reserving for their other limits would only hold units nobody spends.
            return [0] * len(hits)
        out: list[int] = []
        for h, k in zip(hits, keys, strict=True):
            r = self._entries.get(k)
            if r is None or now - r.since > _RATE_WINDOW_S:
                # First sighting, or quiet for a while: nothing is known about its rate yet.
                if r is None:
                    r = self._entries[k] = Reserve()
                    if len(self._entries) > self._max_entries:
                        self._evict()
                r.since, r.demand, r.left_at_since = now, h.cost, r.left
                out.append(0)
                continue
            r.demand += h.cost
            covered = (
                r.left >= h.cost
                and now < r.valid_until - self._horizon / 2
                and r.limit == h.rule.requests
            )
            if r.asking or covered:
                out.append(0)
                continue
            usable = now < r.valid_until and r.limit == h.rule.requests
            out.append(self._ask(r, now, r.left if usable else 0))
        return out

    def refill(self, found: Sequence[Reserve], now: float) -> list[tuple[int, int]] | None:
        """(hit index, units) to reserve ahead for reserves running low, or None.

        A reserve is low when half of what it held after its last grant is spent, or half of
        its time has passed. Topping it up then, in the background, keeps a busy subject on
        its reserves: without it, every reserve runs dry now and then, and the requests that
        find it so wait for the store.
        """
        out: list[tuple[int, int]] | None = None
        for i, r in enumerate(found):
            if not self._low(r, now):
                continue  # the common case: nothing allocated
            if (units := self._ask(r, now, r.left if now < r.valid_until else 0)) > 0:
                if out is None:
                    out = []
                out.append((i, units))
        return out

    def _ask(self, r: Reserve, now: float, held: int) -> int:
        """Units that top `held` up to the coming horizon at the rate seen since the last ask
        (at least one: a grant renews the whole reserve's time); marks r asking."""
        elapsed = max(now - r.since, _MIN_ELAPSED_S)
        asked = r.demand + r.left_at_since - r.left
        aim = min(int(asked / elapsed * self._horizon), self._max_units)
        if aim <= 0:
            return 0
        r.asking = True
        r.since, r.demand, r.left_at_since = now, 0, r.left
        self._mark(r)
        return max(aim - held, 1)

    def settle(
        self,
        keys: Sequence[str],
        calls: Sequence[LimitCall],
        results: Sequence[CallResult] | None,
        now: float,
    ) -> None:
        """Record what the store granted (results None: the call failed, nothing granted)."""
        for i, (k, c) in enumerate(zip(keys, calls, strict=True)):
            if c.extra <= 0:
                if results is not None and c.cost > 0:
                    self._observe(k, c, results[i], now)
                continue
            r = self._entries.get(k)
            if r is None:
                continue  # evicted meanwhile; a grant below is then given back
            r.asking = False
            if results is None or (res := results[i]).granted <= 0:
                self._mark(r)  # nothing granted: only asking changed
                continue
            if r.left > 0 and (r.stamp != res.stamp or now >= r.valid_until or r.limit != c.limit):
                self._owe(r, now=now)  # units of another window or limit: back to the store
            r.call = c
            r.limit = c.limit
            r.left += res.granted
            r.left_at_since += res.granted
            r.full = r.left
            r.base = max(0, res.remaining)
            r.used = res.used
            r.stamp = res.stamp
            r.reset_at = now + max(0, res.reset_ms) / 1000
            valid = now + self._horizon
            # reset_ms is rounded up to a whole millisecond: the window may end up to 1 ms
            # before reset_at, and units counted in it must not be spent in the next one.
            window_end = r.reset_at - 0.001
            r.capped = c.strategy in _WINDOWED and window_end < valid
            if r.capped:
                valid = window_end
            r.valid_until = valid
            self._mark(r)
            self.epoch += 1
            heapq.heappush(self._expiry, (valid, next(self._seq), r))
        for k, c, res in zip(keys, calls, results or (), strict=False):
            if c.extra > 0 and res.granted > 0 and k not in self._entries:
                self._owed.append((dataclasses.replace(c, cost=res.granted, extra=0), res.stamp))

    def _observe(self, key: str, c: LimitCall, res: CallResult, now: float) -> None:
        """A store answer for a key this instance holds units of, that reserved nothing: what
        answers from reserves report as remaining must follow what it consumed."""
        r = self._entries.get(key)
        if r is None or r.left <= 0 or r.limit != c.limit or r.stamp != res.stamp:
            return
        r.base = max(0, res.remaining)
        r.used = res.used
        r.reset_at = now + max(0, res.reset_ms) / 1000
        self.epoch += 1

    def expired(self, now: float) -> list[GiveBack]:
        """Leftovers of reservations that ended: the units to give back to the store."""
        out, self._owed = self._owed, []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, r = heapq.heappop(heap)
            if r.valid_until <= now and r.left > 0:
                self._owe(r, out, now)
        return out

    def owe_again(self, owed: Sequence[GiveBack]) -> None:
        """Give-backs the store did not even attempt: retried with the next ones (bounded)."""
        room = self._max_entries - len(self._owed)
        self._owed.extend(owed[: max(0, room)])

    def drain(self) -> list[GiveBack]:
        """Everything held, for shutdown."""
        out, self._owed = self._owed, []
        for r in self._entries.values():
            if r.left > 0:
                self._owe(r, out)
        self._expiry.clear()
        return out

    def _owe(self, r: Reserve, into: list[GiveBack] | None = None, now: float = 0.0) -> None:
        assert r.call is not None  # left > 0 only after a grant
        left, r.left = r.left, 0
        r.left_at_since -= left
        if r.call.strategy == "fixed_window" and now >= r.reset_at:
            return  # that window has ended and its count with it: nothing to give back
        (self._owed if into is None else into).append(
            (dataclasses.replace(r.call, cost=left, extra=0), r.stamp)
        )

    def _evict(self) -> None:
        # Oldest first; what it held goes back to the store.
        key = next(iter(self._entries))
        r = self._entries.pop(key)
        if r.left > 0:
            self._owe(r)


def spends_of(found: Sequence[Reserve], needs: Sequence[tuple[int, int]]) -> tuple[Spend, ...]:
    """Each reserve with its hit's (cost, limit), as take_from() spends them."""
    return tuple((r, cost, limit) for r, (cost, limit) in zip(found, needs, strict=True))


def _undo(spends: Sequence[Spend], short: Reserve) -> None:
    """Give back what a spend took from the reserves before `short`, the one that failed it
    (the reserves are distinct, so the first that is `short` is where the spend stopped)."""
    for back, paid, _ in spends:
        if back is short:
            break
        back.left += paid
