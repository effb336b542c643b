"""Every Prometheus metric, defined in one place, recorded without locks on the hot path.

The request path only bumps plain ints (a dict lookup and an add); prometheus_client's
own metric objects take a lock and walk buckets in Python on every observation, which
measured at several microseconds per request. At scrape time `MetricsCollector` turns the
numbers into metric families. With several workers each one writes a snapshot file once a
second, and whichever worker answers the scrape adds them all up, so `/metrics` shows
totals across workers. A restarted worker continues from its predecessor's snapshot, so
counters stay monotonic.

Labels are routes, status classes, decisions and reasons: never API keys, IPs or paths.
"""

from __future__ import annotations

import contextlib
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
UNMATCHED_ROUTE = "unmatched"
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


class Histogram:
    """Fixed buckets; `counts[i]` counts observations ≤ LATENCY_BUCKETS[i] (last = +Inf)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds


class ProxyMetrics:
    """This process's numbers. Plain ints and dicts: one event loop, no locks needed."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.denials: dict[tuple[str, str], int] = {}
        self.request_latency: dict[str, Histogram] = {}
        self.upstream_latency: dict[str, Histogram] = {}
        self.upstream_errors: dict[str, int] = {}
        self.client_timeouts: dict[str, int] = {}  # "head" (slowloris), "send" (stalled reader)
        self.in_flight = 0
        self.reloads: dict[str, int] = {}
        self.limiter: dict[str, int] = {}  # RateLimiter.stats, copied at snapshot time
        self.degraded_workers = 0
        self._limiter_source: Any = None

    def watch_limiter(self, limiter: Any) -> None:
        """Include a RateLimiter's plain counters and degraded flag in every snapshot."""
        self._limiter_source = limiter

    def record(self, route: str, status: int, decision: str, reason: str, seconds: float) -> None:
        key = (route, _STATUS_CLASS.get(status // 100, "other"), decision)
        self.requests[key] = self.requests.get(key, 0) + 1
        if reason:
            reason_key = (route, reason)
            self.denials[reason_key] = self.denials.get(reason_key, 0) + 1
        histogram = self.request_latency.get(route)
        if histogram is None:
            histogram = self.request_latency[route] = Histogram()
        histogram.observe(seconds)

    def record_upstream(self, route: str, seconds: float) -> None:
        histogram = self.upstream_latency.get(route)
        if histogram is None:
            histogram = self.upstream_latency[route] = Histogram()
        histogram.observe(seconds)

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1

    def client_timeout(self, kind: str) -> None:
        self.client_timeouts[kind] = self.client_timeouts.get(kind, 0) + 1

    def reload(self, outcome: str) -> None:
        self.reloads[outcome] = self.reloads.get(outcome, 0) + 1

    # -- snapshots for multi-worker totals ----------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        source = self._limiter_source
        if source is not None:
            self.limiter = source.stats.counts()
            self.degraded_workers = int(source.degraded)
        return {
            "limiter": self.limiter,
            "degraded_workers": self.degraded_workers,
            "requests": [[*key, n] for key, n in self.requests.items()],
            "denials": [[*key, n] for key, n in self.denials.items()],
            "request_latency": {r: [h.counts, h.total] for r, h in self.request_latency.items()},
            "upstream_latency": {r: [h.counts, h.total] for r, h in self.upstream_latency.items()},
            "upstream_errors": self.upstream_errors,
            "client_timeouts": self.client_timeouts,
            "reloads": self.reloads,
            "in_flight": self.in_flight,
        }

    def absorb(self, snap: dict[str, Any], *, gauges: bool = True) -> None:
        """Add another snapshot's numbers to these (for totals, or continuing after restart)."""
        for route, klass, decision, n in snap.get("requests", ()):
            key = (route, klass, decision)
            self.requests[key] = self.requests.get(key, 0) + n
        for route, reason, n in snap.get("denials", ()):
            self.denials[(route, reason)] = self.denials.get((route, reason), 0) + n
        for attr in ("request_latency", "upstream_latency"):
            target: dict[str, Histogram] = getattr(self, attr)
            for route, (counts, total) in snap.get(attr, {}).items():
                histogram = target.setdefault(route, Histogram())
                if len(counts) == len(histogram.counts):
                    histogram.counts = [
                        a + b for a, b in zip(histogram.counts, counts, strict=True)
                    ]
                    histogram.total += total
        for attr in ("upstream_errors", "client_timeouts", "reloads", "limiter"):
            by_name: dict[str, int] = getattr(self, attr)
            for name, n in snap.get(attr, {}).items():
                by_name[name] = by_name.get(name, 0) + n
        if gauges:
            self.in_flight += int(snap.get("in_flight", 0))
            self.degraded_workers += int(snap.get("degraded_workers", 0))


class SnapshotFiles:
    """`<run_dir>/metrics/worker-<i>.json`: one file per worker slot, replaced atomically."""

    def __init__(self, run_dir: Path, index: int) -> None:
        self.directory = run_dir / "metrics"
        self.path = self.directory / f"worker-{index}.json"

    def write(self, metrics: ProxyMetrics) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(metrics.snapshot()))
        tmp.replace(self.path)

    def read_own(self) -> dict[str, Any] | None:
        return _read(self.path)

    def read_others(self) -> Iterator[dict[str, Any]]:
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("worker-*.json")):
            if path != self.path and (snap := _read(path)) is not None:
                yield snap


def _read(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, orjson.JSONDecodeError):
        data = orjson.loads(path.read_bytes())
        if isinstance(data, dict):
            return data
    return None


class MetricsCollector(Collector):
    """Exposes ProxyMetrics (plus other workers' snapshots) as Prometheus families."""

    def __init__(
        self,
        metrics: ProxyMetrics,
        files: SnapshotFiles | None = None,
        extra: Any = None,
    ) -> None:
        self._metrics = metrics
        self._files = files
        self._extra = extra  # callable returning more families (storage, degraded state)

    def collect(self) -> Iterator[Metric]:
        total = ProxyMetrics()
        total.absorb(self._metrics.snapshot())
        if self._files is not None:
            for snap in self._files.read_others():
                total.absorb(snap)
        yield from _families(total)
        if self._extra is not None:
            yield from self._extra()


def _families(m: ProxyMetrics) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "shieldproxy_requests",
        "Requests answered, by route, status class and decision (allow, deny, shadow_deny; "
        "cancelled with status 499: the client hung up, or the shutdown budget ended, before "
        "the answer began; "
        "error with status 500: a bug, logged).",
        labels=["route", "status_class", "decision"],
    )
    for (route, klass, decision), n in sorted(m.requests.items()):
        requests.add_metric([route, klass, decision], n)
    yield requests
    denials = CounterMetricFamily(
        "shieldproxy_denials", "Requests denied, by route and reason.", labels=["route", "reason"]
    )
    for (route, reason), n in sorted(m.denials.items()):
        denials.add_metric([route, reason], n)
    yield denials
    for name, doc, source in (
        ("shieldproxy_request_duration_seconds", "Time to answer a request.", m.request_latency),
        (
            "shieldproxy_upstream_duration_seconds",
            "Time from sending to the upstream until its response head arrived.",
            m.upstream_latency,
        ),
    ):
        family = HistogramMetricFamily(name, doc, labels=["route"])
        for route, histogram in sorted(source.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*LATENCY_BUCKETS, float("inf")), histogram.counts, strict=True
            ):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric([route], buckets, histogram.total)
        yield family
    yield _counter_by(
        "shieldproxy_upstream_errors", "Upstream failures by kind.", "kind", m.upstream_errors
    )
    yield _counter_by(
        "shieldproxy_client_timeouts",
        "Client connections closed for slowness: head (request head too slow, 408), "
        "send (the client did not take its buffered response within "
        "server.send_timeout_seconds).",
        "kind",
        m.client_timeouts,
    )
    yield _counter_by(
        "shieldproxy_config_reloads", "SIGHUP reloads by outcome.", "outcome", m.reloads
    )
    yield GaugeMetricFamily(
        "shieldproxy_in_flight_requests", "Requests being answered now.", value=m.in_flight
    )
    yield _counter_by(
        "shieldproxy_ratelimit_events",
        "Rate-limit engine events: checks, denied, cache_denied (no storage call), "
        "shadow_denied, degraded (answered by fallback), reserved (admitted from units reserved "
        "ahead, no storage call), refills (background calls reserving more for a busy subject), "
        "given_back (reserved units returned unspent), renewed (concurrency leases extended for "
        "requests outliving half a lease, or put back into a store that lost them), errors.",
        "event",
        m.limiter,
    )
    yield GaugeMetricFamily(
        "shieldproxy_store_degraded_workers",
        "Workers answering limits from their fallback because the store is failing.",
        value=m.degraded_workers,
    )


def _counter_by(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """One counter family with a sample per label value (sorted, so scrapes read stably)."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in sorted(counts.items()):
        family.add_metric([value], n)
    return family
