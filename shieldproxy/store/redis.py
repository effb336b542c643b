"""Redis store: limits.lua via redis-py asyncio, coalesced per loop turn; records via mixin."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.maint_notifications import MaintNotificationsConfig

from shieldproxy.limits import keys
from shieldproxy.store.base import (
    CallResult,
    LimitCall,
    Store,
    StoreConnectionError,
    StoreError,
    StoreMisuse,
    StoreRefused,
    StoreTimeout,
    StoreUnavailable,
    batch_admits,
    consumed,
)
from shieldproxy.store.breaker import CircuitBreaker
from shieldproxy.store.pubsub import RedisBus
from shieldproxy.store.redis_records import RedisRecords
from shieldproxy.store.scripts import Script, decode, encode, encode_refund, load_script
from shieldproxy.store.urls import RedisTarget

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = tuple[Sequence[str | bytes], Sequence[str | bytes | int]]
_Pending = tuple[list[LimitCall], "asyncio.Future[list[CallResult]]"]

# Replies that mean "this server cannot serve right now" rather than "you sent something wrong".
_UNAVAILABLE = (
    rex.ConnectionError,  # includes BusyLoadingError (LOADING) and MaxConnectionsError
    rex.TimeoutError,
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MasterDownError,
    rex.ReadOnlyError,
    rex.MovedError,
    rex.AskError,
    rex.SlotNotCoveredError,
    rex.ClusterError,
    rex.RedisClusterException,
    OSError,
)


def no_retry() -> Retry:
    """redis-py's default retries would multiply the hot-path budget; the breaker decides."""
    return Retry(NoBackoff(), 0)


def bus_client(host: str, port: int, options: dict[str, Any]) -> Redis:
    """A plain client for pub/sub (store/pubsub.py), with the store's credentials and TLS."""
    return Redis(host=host, port=port, **options, retry=no_retry(), socket_connect_timeout=1.0)


_REFUSALS = (
    rex.AuthenticationError,  # WRONGPASS, NOAUTH
    rex.AuthorizationError,
    rex.NoPermissionError,  # NOPERM: the ACL user may not run our commands or keys
    ssl.SSLCertVerificationError,
)


def _refusal(exc: BaseException) -> BaseException | None:
    """The error in exc's chain saying the server refused our password or certificate."""
    seen: BaseException | None = exc
    for _ in range(8):  # redis-py wraps and retries: the reason may sit a few links down
        if seen is None:
            return None
        if isinstance(seen, _REFUSALS):
            return seen
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):  # redis-py keeps only the SSL message
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _translate(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if (refused := _refusal(exc)) is not None:
        return StoreRefused(f"redis refused this client: {type(refused).__name__}: {refused}")
    if isinstance(exc, TimeoutError | rex.TimeoutError):
        return StoreTimeout(f"redis: no reply in time ({type(exc).__name__})")
    if isinstance(exc, _UNAVAILABLE):
        return StoreConnectionError(f"redis: {type(exc).__name__}: {exc}")
    return StoreMisuse(f"redis: {type(exc).__name__}: {exc}")


@dataclasses.dataclass(slots=True)
class RedisStats:
    """Counters for metrics and benchmarks; plain ints, read by metrics.py."""

    requests: int = 0  # acquire() calls
    round_trips: int = 0  # flushes that reached the network
    orphan_releases: int = 0  # leases freed because their caller was cancelled
    orphan_refunds: int = 0  # reserve grants given back because their caller was cancelled


class RedisStore(RedisRecords, Store):
    """Standalone Redis (redis://, rediss://); RedisClusterStore reuses everything but routing.

    Hot path: every `acquire` made during one event-loop turn is queued and sent on the next as
    one EVALSHA evaluating all of them in order (one round trip, one script call), with no
    redis-py retries, a hard per-call budget and a circuit breaker. Caller cancellation (a client
    hanging up) never interrupts socket I/O, because callers only await a future that a separate
    flush task fulfils; when the flush itself times out, redis-py drops the connection mid-reply
    instead of returning it to the pool out of step (the CVE-2023-28858 failure mode). A timeout
    after the script ran leaves that request's units consumed (strict, never over-admitting;
    leases expire after their window). tests/unit/test_store_cancel.py proves the pool stays in
    step.
    """

    shared = True

    def __init__(
        self,
        client: Any,
        *,
        prefix: str,
        timeout_seconds: float,
        breaker: CircuitBreaker,
        clock_override: Callable[[], float] | None = None,
        records_timeout_seconds: float = 2.0,
        max_requests_per_call: int = 64,
        bus_connect: Callable[[], Any] | None = None,
    ) -> None:
        self._client = client
        self._bus = RedisBus(bus_connect or (lambda: client), prefix)
        self._prefix = self.prefix = prefix
        self._timeout = timeout_seconds
        self._records_timeout = max(records_timeout_seconds, timeout_seconds)
        self._breaker = breaker
        # Test-only: scripts take their time from TIME unless a fake clock is injected.
        self._clock_override = clock_override
        self._max_requests = max_requests_per_call
        self._limits = load_script("limits")
        self._heartbeat = load_script("heartbeat")
        self._pending: list[_Pending] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._data_lost: list[Callable[[], Awaitable[None]]] = []
        self._restoring: asyncio.Task[None] | None = None  # running the callbacks above
        self._lost_again = False  # found out again while they ran: run them once more
        self._found_empty = False  # a call found the scripts gone: tell once Redis has answered
        self._ran: set[str] = set()  # scripts that have run here: their loss means a restart
        self._closing = False
        self._beating: set[str] = set()  # instance ids that have had a heartbeat through
        self.stats = RedisStats()

    @classmethod
    def from_target(cls, target: RedisTarget, **kwargs: Any) -> RedisStore:
        (host, port), options = target.nodes[0], target.options
        timeout = kwargs["timeout_seconds"]
        client = Redis(
            host=host,
            port=port,
            **options,
            retry=no_retry(),
            # Backstops only: asyncio.timeout(budget) cuts every call first.
            socket_timeout=max(1.0, timeout * 10),
            socket_connect_timeout=max(1.0, timeout * 10),
            health_check_interval=0,
            max_connections=256,
            driver_info=None,  # no CLIENT SETINFO round trips on every new connection
            # nor CLIENT MAINT_NOTIFICATIONS (Redis 8 only): new connections cost one trip
            maint_notifications_config=MaintNotificationsConfig(enabled=False),
        )
        kwargs.setdefault("bus_connect", lambda: bus_client(host, port, options))
        return cls(client, **kwargs)

    def _slot(self, key: str) -> int:
        # One server: everything can go into one script call.
        return 0

    def _now_ms(self) -> int | None:
        return None if self._clock_override is None else math.floor(self._clock_override() * 1000)

    async def _guarded(
        self, op: Callable[[], Awaitable[T]], budget: float, *, retry: bool = True
    ) -> T:
        probe = self._breaker.before_call()
        try:
            async with asyncio.timeout(budget):
                try:
                    result = await op()
                except rex.ConnectionError as exc:
                    if not retry or isinstance(exc, rex.BusyLoadingError | rex.MaxConnectionsError):
                        raise
                    # Pooled connections die silently when Redis restarts; the first use then
                    # fails before the command ran. One immediate retry on a fresh connection,
                    # inside the same budget, hides that; if the server is really down the retry
                    # is refused in microseconds. (A reply lost after the script ran would count
                    # that request twice: strict, never over-admitting.)
                    log.debug("redis connection lost (%s); retrying once", exc)
                    result = await op()
        except asyncio.CancelledError:
            self._breaker.abandoned(probe)  # never leave a half-open probe marked in flight
            raise
        except (rex.RedisError, rex.RedisClusterException, OSError, TimeoutError) as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Our caller was cancelled while the call also failed or timed out (easy under
                # CPU load): the cancellation must win, or a task being shut down would carry on.
                self._breaker.failure()
                raise asyncio.CancelledError from exc
            err = _translate(exc)
            if isinstance(err, StoreUnavailable):
                self._breaker.failure()
            else:
                self._answered()
            raise err from exc
        self._answered()
        return result

    def _answered(self) -> None:
        self._breaker.success()
        if self._found_empty:
            # Only now: had the call that found out been the half-open probe, the restore's
            # own calls would have been turned away while it ran.
            self._found_empty = False
            self._lost_data()

    async def _roundtrip(self, script: Script, jobs: Sequence[Job]) -> list[Any]:
        """Run jobs (one EVALSHA each) in one pipelined trip; reload once on NOSCRIPT."""
        self.stats.round_trips += 1
        results = await self._evalsha_many(script, jobs)
        missing = [i for i, r in enumerate(results) if isinstance(r, rex.NoScriptError)]
        if missing:
            # A restarted or failed-over Redis has an empty script cache: load and retry once,
            # so callers never see an error for it.
            log.info("redis script cache empty; loading %s", script.name)
            await self._client.script_load(script.source)
            if script.name in self._ran:
                # It ran before, so Redis restarted (or failed over, or was flushed), most
                # likely empty: what others hold goes back once this call has its answer.
                self._found_empty = True
            again = await self._evalsha_many(script, [jobs[i] for i in missing])
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        for r in results:
            if isinstance(r, BaseException):
                raise r
        self._ran.add(script.name)
        return results

    def on_data_lost(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._data_lost.append(callback)

    def _lost_data(self) -> None:
        """Run the callbacks in a task of their own, outside the budget of the call that found
        out: one run at a time, and once more if anyone finds out again while it runs (a second
        restart must not be missed because the first restore was still busy)."""
        if not self._data_lost or self._closing:
            return
        if self._restoring is not None and not self._restoring.done():
            self._lost_again = True
            return
        self._restoring = self._spawn(self._run_lost_data())

    async def _run_lost_data(self) -> None:
        while True:
            self._lost_again = False
            for callback in self._data_lost:
                try:
                    await callback()
                except Exception:  # one holder's bug must not keep the others' state out
                    log.exception("putting state back into redis failed")
            if not self._lost_again or self._closing:
                return

    async def _evalsha_many(self, script: Script, jobs: Sequence[Job]) -> list[Any]:
        if len(jobs) == 1:
            ks, args = jobs[0]
            try:
                return [await self._client.evalsha(script.sha, len(ks), *ks, *args)]
            except rex.NoScriptError as exc:
                return [exc]
        pipe = self._client.pipeline(transaction=False)
        for ks, args in jobs:
            # execute_command, not pipe.evalsha: redis-py's ClusterPipeline refuses the latter by
            # name, but routes the raw command by its keys (one slot per job) just fine.
            pipe.execute_command("EVALSHA", script.sha, len(ks), *ks, *args)
        return list(await pipe.execute(raise_on_error=False))

    # ---- limits -------------------------------------------------------------------------------

    async def acquire(self, calls: Sequence[LimitCall]) -> list[CallResult]:
        if not calls:
            return []
        self.stats.requests += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[CallResult]] = loop.create_future()
        self._pending.append((list(calls), fut))
        if len(self._pending) == 1:
            # Everything queued during this loop turn goes out together on the next one.
            loop.call_soon(self._start_flush)
        try:
            return await fut
        except asyncio.CancelledError:
            # Cancelled after the reply arrived but before we resumed: the result is ours to
            # clean up (cancelled before the reply: _flush finds the future done and does it).
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._spawn(self._settle_orphans([(calls, fut.result())]))
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of the store's own, which close() waits for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _settle_orphans(
        self, done: list[tuple[Sequence[LimitCall], list[CallResult]]]
    ) -> None:
        """The caller went away after we sent its request (its client hung up). Its own units
        stay counted, as for any admitted request; its leases are freed now rather than when
        they expire, and units reserved ahead for its subject go back, since nobody will
        record them as held."""
        leases: list[LimitCall] = []
        grants: list[tuple[LimitCall, int]] = []
        for calls, res in done:
            if not batch_admits(calls, res):
                continue
            for c, r in zip(calls, res, strict=True):
                if _holds_lease(c, r):
                    leases.append(c)
                elif r.granted > 0:
                    grants.append((dataclasses.replace(c, cost=r.granted, extra=0), r.stamp))
        if leases:
            self.stats.orphan_releases += 1
            try:
                await self.release(leases)
            except StoreError as exc:
                log.warning("could not release leases of a cancelled request: %s", exc)
        if grants:
            self.stats.orphan_refunds += 1
            try:
                await self.refund([c for c, _ in grants], [stamp for _, stamp in grants])
            except StoreError as exc:
                # Strict, not lost: the units stay counted until their window or period ends.
                log.warning("could not give back units reserved for a cancelled request: %s", exc)

    def _start_flush(self) -> None:
        batch, self._pending = self._pending, []
        self._spawn(self._flush(batch))

    async def _flush(self, batch: list[_Pending]) -> None:
        # A caller that hung up before we sent anything costs nothing.
        batch = [(calls, fut) for calls, fut in batch if not fut.cancelled()]
        if not batch:
            return
        requests = [calls for calls, _ in batch]
        try:
            results = await self._guarded(lambda: self._acquire_many(requests), self._timeout)
        except BaseException as exc:
            # Whatever happens, no waiter may hang: a bug becomes StoreMisuse for each of them.
            if not isinstance(exc, StoreError):
                log.exception("rate-limit batch failed unexpectedly")
            err = exc if isinstance(exc, StoreError) else StoreMisuse(repr(exc))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(type(err)(*err.args))
            if not isinstance(exc, Exception):
                raise
            return
        gone: list[tuple[Sequence[LimitCall], list[CallResult]]] = []
        for (calls, fut), res in zip(batch, results, strict=True):
            if fut.done():
                gone.append((calls, res))
            else:
                fut.set_result(res)
        if gone:
            await self._settle_orphans(gone)

    async def _acquire_many(self, requests: list[list[LimitCall]]) -> list[list[CallResult]]:
        now = self._now_ms()
        if type(self)._slot is RedisStore._slot:
            # One server, one slot: no splitting, so no partial commits to refund either.
            step = self._max_requests
            batches = [requests[i : i + step] for i in range(0, len(requests), step)]
            batches = _reserve_last(batches)
            answers = await self._roundtrip(
                self._limits, [encode(b, "acquire", now) for b in batches]
            )
            results: list[list[CallResult]] = []
            for b, reply in zip(batches, answers, strict=True):
                results += decode(reply, b)
            return results
        # Split each request by slot; one script call per slot carries every request's part.
        parts: dict[int, list[tuple[int, list[int]]]] = {}
        for ri, calls in enumerate(requests):
            by_slot: dict[int, list[int]] = {}
            for ci, c in enumerate(calls):
                by_slot.setdefault(self._slot(c.key), []).append(ci)
            for slot, idxs in by_slot.items():
                parts.setdefault(slot, []).append((ri, idxs))
        jobs: list[Job] = []
        layout: list[tuple[list[tuple[int, list[int]]], list[list[LimitCall]]]] = []
        for items in parts.values():
            chunks = [
                items[start : start + self._max_requests]
                for start in range(0, len(items), self._max_requests)
            ]
            subs = _reserve_last(
                [[[requests[ri][ci] for ci in idxs] for ri, idxs in chunk] for chunk in chunks]
            )
            for chunk, sub in zip(chunks, subs, strict=True):
                jobs.append(encode(sub, "acquire", now))
                layout.append((chunk, sub))
        replies = await self._roundtrip(self._limits, jobs)
        out: list[list[CallResult]] = [[] for _ in requests]
        slots: list[dict[int, CallResult]] = [{} for _ in requests]
        groups: list[list[list[int]]] = [[] for _ in requests]
        for (chunk, sub), reply in zip(layout, replies, strict=True):
            for (ri, idxs), res in zip(chunk, decode(reply, sub), strict=True):
                slots[ri].update(zip(idxs, res, strict=True))
                groups[ri].append(idxs)
        for ri, calls in enumerate(requests):
            out[ri] = [slots[ri][ci] for ci in range(len(calls))]
        await self._refund_partial(requests, out, groups, now)
        return out

    async def _refund_partial(
        self,
        requests: list[list[LimitCall]],
        out: list[list[CallResult]],
        groups: list[list[list[int]]],
        now: int | None,
    ) -> None:
        """Undo slot groups that committed when another group of the same request denied.

        Only requests spread over several slots (cluster) can get here; see redis_cluster.py for
        why we consume-then-refund rather than check-then-consume.
        """
        back_calls: list[LimitCall] = []
        back_stamps: list[int] = []
        for ri, calls in enumerate(requests):
            if len(groups[ri]) < 2 or batch_admits(calls, out[ri]):
                continue
            for idxs in groups[ri]:
                sub = [calls[i] for i in idxs]
                if not batch_admits(sub, [out[ri][i] for i in idxs]):
                    continue  # that group consumed nothing
                for i in idxs:
                    c, r = calls[i], out[ri][i]
                    if consumed(c, r):
                        # units reserved along with the request go back too
                        back = dataclasses.replace(c, cost=c.cost + r.granted, extra=0)
                        back_calls.append(back)
                        # a token_bucket stamp would limit the refund to what time has not
                        # refilled: this one undoes the consumption of this very flush in full
                        back_stamps.append(0 if c.strategy == "token_bucket" else r.stamp)
                        out[ri][i] = _refunded(back, r)
        if back_calls:
            await self._roundtrip(self._limits, self._refund_jobs(back_calls, back_stamps, now))

    def _refund_jobs(
        self, calls: Sequence[LimitCall], stamps: Sequence[int], now: int | None
    ) -> list[Job]:
        """One "refund" script call per slot."""
        by_slot: dict[int, tuple[list[LimitCall], list[int]]] = {}
        for c, stamp in zip(calls, stamps, strict=True):
            group = by_slot.setdefault(self._slot(c.key), ([], []))
            group[0].append(c)
            group[1].append(stamp)
        return [encode_refund(cs, st, now) for cs, st in by_slot.values()]

    async def refund(self, calls: Sequence[LimitCall], stamps: Sequence[int]) -> None:
        wanted = [
            (c, stamp)
            for c, stamp in zip(calls, stamps, strict=True)
            if c.cost > 0 and c.strategy != "concurrency"
        ]
        jobs = self._refund_jobs([c for c, _ in wanted], [s for _, s in wanted], self._now_ms())
        if jobs:
            # Never retried: a refund whose reply was lost may have run, and running it twice
            # would give back units nobody reserved.
            await self._guarded(
                lambda: self._roundtrip(self._limits, jobs), self._timeout, retry=False
            )

    async def _write(self, calls: Sequence[LimitCall], mode: str) -> None:
        by_slot: dict[int, list[LimitCall]] = {}
        for c in calls:
            by_slot.setdefault(self._slot(c.key), []).append(c)
        now = self._now_ms()
        jobs = [encode([group], mode, now) for group in by_slot.values()]
        if jobs:
            await self._guarded(lambda: self._roundtrip(self._limits, jobs), self._timeout)

    async def charge(self, calls: Sequence[LimitCall]) -> None:
        await self._write(calls, "charge")

    async def release(self, calls: Sequence[LimitCall]) -> None:
        await self._write([c for c in calls if c.strategy == "concurrency"], "release")

    async def renew(self, calls: Sequence[LimitCall]) -> None:
        await self._write([c for c in calls if c.strategy == "concurrency"], "renew")

    async def heartbeat(self, instance_id: str, ttl_seconds: float) -> int:
        now = self._now_ms()
        ttl_ms = max(1, round(ttl_seconds * 1000))
        job: Job = (
            [keys.instances_key(self._prefix)],
            [instance_id, ttl_ms, "" if now is None else now, "1" if ttl_seconds <= 0 else "0"],
        )
        replies = await self._guarded(
            lambda: self._roundtrip(self._heartbeat, [job]), self._records_timeout
        )
        live, absent = (int(n) for n in replies[0])
        if ttl_seconds > 0:
            # Only the first process to call a restarted Redis gets NOSCRIPT; every instance
            # learns it here within one heartbeat, by finding itself gone from the live set.
            if absent and instance_id in self._beating:
                log.info("redis lost this instance's heartbeat: restarted empty, or unreachable")
                self._lost_data()
            self._beating.add(instance_id)
        else:
            self._beating.discard(instance_id)
        return live

    async def ping(self) -> None:
        # Startup's check, not the hot path: a first TLS handshake or cluster discovery may
        # take longer than a limit call's budget.
        await self._guarded(self._client.ping, self._records_timeout)

    async def close(self) -> None:
        self._closing = True
        await self._bus.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()

    async def publish(self, channel: str, message: str) -> None:
        await self._rec(lambda: self._bus.publish(channel, message))

    async def subscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        await self._bus.subscribe(channel, callback)

    async def _rec(self, op: Callable[[], Awaitable[T]]) -> T:
        return await self._guarded(op, self._records_timeout)


def _reserve_last(batches: list[list[list[LimitCall]]]) -> list[list[list[LimitCall]]]:
    """Only the last script call of a flush may reserve units (`extra`).

    limits.lua grants reservations from what all requests of one script call left over; a
    flush split into several calls must not let an early call reserve units that a request
    in a later call of the same flush then finds missing.
    """
    if len(batches) < 2:
        return batches
    head = [
        [[dataclasses.replace(c, extra=0) if c.extra else c for c in calls] for calls in batch]
        for batch in batches[:-1]
    ]
    return [*head, batches[-1]]


def _holds_lease(call: LimitCall, result: CallResult) -> bool:
    return call.strategy == "concurrency" and result.allowed and call.cost > 0


def _refunded(call: LimitCall, result: CallResult) -> CallResult:
    """The result as it stands once the refund gave the call's cost (and grant) back."""
    if call.strategy == "quota":
        used = max(0, result.used - call.cost)
        remaining = max(0, call.limit - used)
        return dataclasses.replace(result, used=used, remaining=remaining, granted=0)
    remaining = min(call.burst, result.remaining + call.cost)
    return dataclasses.replace(result, remaining=remaining, granted=0)
