"""Python twins of store/lua/limits.lua: the same six algorithms over in-process memory."""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from shieldproxy.store.base import GRANT_SHARE, RESERVABLE, CallResult, LimitCall

QUOTA_KEEP_MS = 40 * 86_400_000  # quota counters outlive their period for usage export/billing


@dataclass(slots=True)
class _Entry:
    """State of one key; which fields are used depends on the strategy."""

    w: int = -1  # window start (fixed/sliding window)
    n: int = 0  # count in the current window
    p: int = 0  # count in the previous window (sliding window)
    tat: float = 0.0  # theoretical arrival time (token bucket)
    zset: list[tuple[float, str]] = field(default_factory=list)  # (score, member), sorted
    expires_ms: float = 0.0  # garbage-collection horizon only; decisions never read it


@dataclass(slots=True)
class _Eval:
    ok: bool
    rem: int
    reset: int
    retry: int
    stamp: int = 0
    used: int = 0
    new: float = 0.0  # token_bucket only: the arrival time after this request
    granted: int = 0


def _zset_purge(e: _Entry, horizon: int) -> None:
    # Members scored <= horizon are gone, like ZREMRANGEBYSCORE -inf horizon.
    cut = bisect.bisect_right(e.zset, (horizon, "\U0010ffff"))
    if cut:
        del e.zset[:cut]


def _zset_eval(c: LimitCall, e: _Entry, horizon: int) -> _Eval:
    _zset_purge(e, horizon)
    n = len(e.zset)
    ok = n + c.cost <= c.limit
    retry = 0
    if not ok:
        if c.cost > c.limit:
            retry = c.window_ms
        else:
            retry = int(e.zset[n + c.cost - c.limit - 1][0] - horizon)
    return _Eval(ok, max(0, c.limit - n), 0, retry)


def _zset_add(c: LimitCall, e: _Entry, score: int, count: int) -> None:
    for i in range(1, count + 1):
        bisect.insort(e.zset, (score, f"{c.token}:{i}"))


def _sw_retry(c: LimitCall, cur: int, prev: int, el: int) -> int:
    w = c.window_ms
    if c.cost > c.limit:
        return w - el
    a = c.limit - cur - c.cost
    if a >= 0:
        # admitted once ceil(prev * (w - el) / w) <= a, i.e. el >= w - a * w / prev
        return w - (a * w) // prev - el
    # the current window alone is over: in the next one it is the previous, weighed down
    emin = max(0, w - ((c.limit - c.cost) * w) // cur)
    return w - el + emin


def _tb_state(c: LimitCall, tat: float, now: int) -> tuple[int, int]:
    interval = c.window_ms / c.limit
    tau = c.burst * interval
    rem = max(0, math.floor((tau - (tat - now)) / interval + 1e-9))
    return rem, math.ceil(max(0, tat - tau + interval - now))


def _grant(c: LimitCall, extra: int, ev: _Eval, now: int) -> int:
    """Reserved units granted after an admitted request (limits.lua `grant`); `ev` evaluates
    `c` at cost 0 on the state the request left."""
    if not ev.ok:
        return 0
    if c.strategy in ("fixed_window", "sliding_window"):
        avail = ev.rem
    elif c.strategy == "quota":
        avail = c.limit - ev.used
    elif c.strategy == "token_bucket":
        interval = c.window_ms / c.limit
        avail = math.floor((c.burst * interval - (ev.new - now)) / interval + 1e-9)
    else:
        return 0
    granted = max(0, min(extra, avail // GRANT_SHARE))
    if granted and c.strategy == "token_bucket":
        ev.new = ev.new + granted * (c.window_ms / c.limit)
    return granted


class MemoryCounters:
    """Limiter state for many keys in one process, bounded in memory.

    Every formula mirrors limits.lua line for line (integer milliseconds, the same float
    operations for GCRA) so that the local store, the degraded-mode fallback and Redis give
    identical answers; tests/unit/test_limits_twins.py checks that on random request sequences.

    sliding_window is the weighted two-window counter: O(1) memory, exact when the previous
    window's traffic was even. Its error is bounded by the fixed-window one: any interval of one
    window length admits at most 2 x limit (all of the previous window's count at its very end,
    weighted as if partly expired); in practice Cloudflare measured 0.003 % of requests misjudged.
    Use sliding_log when exactness matters more than memory (one entry per unit of cost).

    Entries are kept in least-recently-touched order: each call sweeps a few expired ones from the
    front (amortised O(1), no background task), and beyond `max_entries` the least recently
    touched entry is evicted even if live, which forgets that subject's usage (fails open for it)
    rather than growing without bound under a flood of distinct subjects.

    Quota counters are billing data, so they live apart and are never evicted: one entry per key
    or tenant per period, dropped 40 days after the period ends. Their times are wall-clock epoch
    ms (`wall`; defaults to `now`, which is wall time when a test drives both), because periods
    are calendar months while `now` may be a monotonic clock. `quota_changed` names the counters
    changed since the owner last took them (LocalStore writes them through to SQLite).
    """

    def __init__(self, *, max_entries: int = 100_000, sweep_per_call: int = 4) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        # Insertion order is roughly expiry order (a later period is created later), which is
        # all the front-of-dict sweep needs.
        self._quota: dict[str, _Entry] = {}
        self.quota_changed: set[str] = set()
        self._max_entries = max_entries
        self._sweep = sweep_per_call

    def __len__(self) -> int:
        return len(self._entries) + len(self._quota)

    def acquire(
        self, calls: Sequence[LimitCall], now: int, wall: int | None = None
    ) -> list[CallResult]:
        """All-or-nothing evaluation of one request, exactly like limits.lua "acquire"."""
        wall = now if wall is None else wall
        self._gc(now, wall)
        fresh: dict[str, _Entry] = {}
        entries = [self._entry_for(c, fresh) for c in calls]
        evals = [self._eval(c, e, now, wall) for c, e in zip(calls, entries, strict=True)]
        admit = all(ev.ok or c.shadow for c, ev in zip(calls, evals, strict=True))
        reserving: list[tuple[int, LimitCall, _Entry]] = []
        for i, (c, e, ev) in enumerate(zip(calls, entries, evals, strict=True)):
            # a shadow quota (overage allowed) counts past its limit: overage is billed
            if admit and (ev.ok or (c.shadow and c.strategy == "quota")):
                if c.cost > 0:
                    self._commit(c, e, ev, now, wall, cost=c.cost)
                if c.extra > 0 and ev.ok and c.strategy in RESERVABLE:
                    reserving.append((i, c, e))
        # Granted last, from what the whole request left over (limits.lua does it per call).
        for i, c, e in reserving:
            free = dataclasses.replace(c, cost=0)
            ev = self._eval(free, e, now, wall)
            granted = _grant(free, c.extra, ev, now)
            if granted:
                self._commit(free, e, ev, now, wall, cost=granted)
                evals[i].rem, evals[i].used, evals[i].granted = ev.rem, ev.used, granted
                if c.strategy == "token_bucket":
                    evals[i].stamp = math.floor(ev.new)
        return [
            CallResult(ev.ok, ev.rem, ev.reset, ev.retry, ev.stamp, ev.used, ev.granted)
            for ev in evals
        ]

    def refund(self, calls: Sequence[LimitCall], stamps: Sequence[int], now: int) -> None:
        """Give back each call's cost in the window starting at its stamp (limits.lua "refund")."""
        for c, stamp in zip(calls, stamps, strict=True):
            if c.cost <= 0:
                continue
            if c.strategy == "quota":
                e = self._quota.get(c.key)
                if e is not None:
                    e.n = max(0, e.n - c.cost)
                    self.quota_changed.add(c.key)
                continue
            e = self._entries.get(c.key)
            if e is None:
                continue
            if c.strategy == "fixed_window":
                if e.w == stamp:
                    e.n = max(0, e.n - c.cost)
            elif c.strategy == "sliding_window":
                if e.w == stamp:
                    e.n = max(0, e.n - c.cost)
                elif e.w == stamp + c.window_ms:
                    e.p = max(0, e.p - c.cost)
            elif c.strategy == "token_bucket":
                if e.expires_ms > 0:
                    interval = c.window_ms / c.limit
                    units = c.cost
                    if stamp > 0:
                        # reserved units: the bucket refills past `stamp` by itself
                        units = min(units, max(0, math.floor((stamp - now) / interval)))
                    if units > 0:
                        e.tat = e.tat - units * interval
            elif c.strategy in ("sliding_log", "concurrency"):
                gone = {f"{c.token}:{i}" for i in range(1, c.cost + 1)}
                e.zset = [item for item in e.zset if item[1] not in gone]

    def charge(self, calls: Sequence[LimitCall], now: int, wall: int | None = None) -> None:
        wall = now if wall is None else wall
        self._gc(now, wall)
        for c in calls:
            if c.strategy == "concurrency" or c.cost <= 0:
                continue
            e = self._entry_for(c, {})
            ev = self._eval(c, e, now, wall)
            if c.strategy == "sliding_log":
                # an entry per unit beyond the limit adds nothing but memory
                _zset_add(c, e, now, min(c.cost, c.limit))
                e.expires_ms = now + c.window_ms
            else:
                self._commit(c, e, ev, now, wall, cost=c.cost)

    def quota_rows(self, keys: Sequence[str]) -> list[tuple[str, int, int]]:
        """(key, count, expiry epoch ms) of the named quota counters that still exist."""
        return [(k, e.n, int(e.expires_ms)) for k in keys if (e := self._quota.get(k)) is not None]

    def load_quota(self, rows: Sequence[tuple[str, int, int]]) -> None:
        """Restore quota counters saved by an earlier process (before any evaluation)."""
        for key, n, expires_ms in rows:
            self._quota[key] = _Entry(n=n, expires_ms=expires_ms)

    def release(self, calls: Sequence[LimitCall]) -> None:
        for c in calls:
            e = self._entries.get(c.key)
            if e is None or c.strategy != "concurrency":
                continue
            gone = {f"{c.token}:{i}" for i in range(1, c.cost + 1)}
            e.zset = [item for item in e.zset if item[1] not in gone]

    def renew(self, calls: Sequence[LimitCall], now: int) -> None:
        """Hold concurrency leases of requests still in flight until `window` from now
        (limits.lua "renew"); a lease that is gone (expired, or lost with the store's data) is
        put back, since its request still runs.

        One pass per key however many of its leases are due (a busy route may hold thousands).
        """
        held: dict[str, tuple[int, set[str]]] = {}
        for c in calls:
            if c.strategy == "concurrency":
                members = held.setdefault(c.key, (c.window_ms, set()))[1]
                members.update(f"{c.token}:{i}" for i in range(1, c.cost + 1))
        for key, (window_ms, members) in held.items():
            if not members:
                continue  # cost 0 holds no slot
            e = self._entry(key)
            _zset_purge(e, now)
            kept = [item for item in e.zset if item[1] not in members]
            expiry = now + window_ms
            renewed: list[tuple[float, str]] = sorted((expiry, m) for m in members)
            # Every live lease expires by now + window, so the renewed ones sort last (ties
            # with a lease granted just now are ordered by member, as in a sorted set).
            e.zset = kept + renewed if not kept or kept[-1] < renewed[0] else sorted(kept + renewed)
            e.expires_ms = max(e.expires_ms, expiry)

    def _entry_for(self, c: LimitCall, fresh: dict[str, _Entry]) -> _Entry:
        if c.strategy != "quota":
            return self._entry(c.key)
        # Not stored until committed: peeks and denials of unknown subjects leave nothing behind.
        e = self._quota.get(c.key)
        return e if e is not None else fresh.setdefault(c.key, _Entry())

    def _entry(self, key: str) -> _Entry:
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry()
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return e

    def _gc(self, now: int, wall: int) -> None:
        for entries, t in ((self._entries, now), (self._quota, wall)):
            for _ in range(self._sweep):
                if not entries:
                    break
                key, e = next(iter(entries.items()))
                if e.expires_ms > t:
                    break
                del entries[key]

    def _eval(self, c: LimitCall, e: _Entry, now: int, wall: int) -> _Eval:
        w = c.window_ms
        if c.strategy == "quota":
            ok = e.n + c.cost <= c.limit
            reset = max(0, c.period_end_ms - wall)
            return _Eval(ok, max(0, c.limit - e.n), reset, 0 if ok else reset, 0, e.n)
        if c.strategy == "fixed_window":
            ws = now - now % w
            n = e.n if e.w == ws else 0
            ok = n + c.cost <= c.limit
            reset = ws + w - now
            return _Eval(ok, max(0, c.limit - n), reset, 0 if ok else reset, ws)
        if c.strategy == "sliding_window":
            cw = now - now % w
            cur, prev = (e.n, e.p) if e.w == cw else ((0, e.n) if e.w == cw - w else (0, 0))
            el = now - cw
            # Rounded up: the estimate never counts fewer than the weighted share, so a window
            # that was full denies until enough of it has faded (floor admitted one request
            # more the moment a full window ended).
            weighted = math.ceil(prev * (w - el) / w) + cur
            ok = weighted + c.cost <= c.limit
            retry = 0 if ok else _sw_retry(c, cur, prev, el)
            e.w, e.n, e.p = cw, cur, prev  # normalise the roll-over; counts unchanged
            return _Eval(ok, max(0, c.limit - weighted), w - el, retry, cw)
        if c.strategy == "sliding_log":
            ev = _zset_eval(c, e, now - w)
            ev.reset = int(e.zset[0][0]) + w - now if e.zset else 0
            return ev
        if c.strategy == "concurrency":
            ev = _zset_eval(c, e, now)
            ev.reset = self._cc_reset(c, e, len(e.zset), now)
            return ev
        interval = w / c.limit
        tat = max(e.tat, now)
        new = tat + c.cost * interval
        ok = new - c.burst * interval <= now
        rem, reset = _tb_state(c, tat, now)
        retry = 0 if ok else math.ceil(new - c.burst * interval - now)
        return _Eval(ok, rem, reset, retry, new=new)

    @staticmethod
    def _cc_reset(c: LimitCall, e: _Entry, used: int, now: int) -> int:
        return 0 if used < c.limit else int(e.zset[0][0]) - now

    def _commit(
        self, c: LimitCall, e: _Entry, ev: _Eval, now: int, wall: int, *, cost: int
    ) -> None:
        """Consume `cost` units (the call's own cost, plus any reserved ones)."""
        w = c.window_ms
        if c.strategy == "quota":
            self._quota.setdefault(c.key, e)
            e.n += cost
            e.expires_ms = max(c.period_end_ms, wall) + QUOTA_KEEP_MS
            self.quota_changed.add(c.key)
            ev.used, ev.rem = e.n, max(0, c.limit - e.n)
        elif c.strategy == "fixed_window":
            if e.w != ev.stamp:
                e.w, e.n = ev.stamp, 0
            e.n += cost
            e.expires_ms = e.w + w
            ev.rem = max(0, c.limit - e.n)
        elif c.strategy == "sliding_window":
            e.n += cost
            e.expires_ms = e.w + 2 * w
            ev.rem = max(0, ev.rem - cost)
        elif c.strategy == "sliding_log":
            n = len(e.zset)
            _zset_add(c, e, now, c.cost)
            e.expires_ms = now + w
            ev.rem = max(0, c.limit - n - c.cost)
            ev.reset = int(e.zset[0][0]) + w - now
        elif c.strategy == "concurrency":
            n = len(e.zset)
            _zset_add(c, e, now + w, c.cost)
            e.expires_ms = now + w
            ev.rem = max(0, c.limit - n - c.cost)
            ev.reset = self._cc_reset(c, e, n + c.cost, now)
        else:
            # ev.new already holds the arrival time after `cost` (see _eval and _grant), computed
            # with the same float operations as limits.lua.
            e.tat = ev.new
            e.expires_ms = math.ceil(e.tat)
            ev.rem, ev.reset = _tb_state(c, e.tat, now)
