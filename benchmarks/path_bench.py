"""Our own code per request, in process: the rate-limit variants without sockets or wrk.

    python benchmarks/path_bench.py [--requests 50000] [--variants no-limits,auth-only,3-limits]

Why: on a starved VM neither wall clock nor callgrind could be read (processes stalled for up
to 0.8 s at a time; a loopback send took milliseconds), yet the question "what does this
change cost per request" still needs an answer. Here one process runs, for each variant of
ratelimit_bench.py, the code shieldproxy runs for a request between aiohttp and the sockets:
the RequestContext, every check of the pipeline, the upstream request head and the one-write
answer for a small upstream response, with real checks, a real key registry and limiter on the
local store (reserves included, as on Redis). Each stage is timed per request and reported as
its median, which a stall of the machine does not move.

What it does not see: aiohttp's parsing and writing, syscalls, the store's round trips (a
busy subject seldom makes one: it is admitted from reserves) and background tasks. It is a
companion to ratelimit_bench.py and instructions_bench.py, whose ratios remain the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.test_utils import make_mocked_request
from yarl import URL

# Run as a script: make the sibling modules importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ratelimit_bench as rb
from harness import BenchError

from shieldproxy.admin.models import Limit
from shieldproxy.config import load_config
from shieldproxy.context import RequestContext
from shieldproxy.forward import Forwarder, ForwardSettings
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.keys.secret import KeyHasher
from shieldproxy.limits.engine import LimiterSettings, RateLimiter
from shieldproxy.metrics import UNMATCHED_ROUTE, ProxyMetrics
from shieldproxy.pipeline import Pipeline, default_checks
from shieldproxy.store import open_store
from shieldproxy.upstream import ResponseHead

DEFAULT_VARIANTS = "no-limits,auth-only,3-limits"
STAGES = ("context", "pipeline", "request head", "answer", "metrics")
# What nginx answers in ratelimit_bench.py, as the upstream connection would have read it.
UPSTREAM_HEAD = ResponseHead(
    200,
    [
        (b"Server", b"nginx"),
        (b"Date", b"Sat, 21 Nov 2026 20:00:00 GMT"),
        (b"Content-Type", b"application/json"),
        (b"Content-Length", b"11"),
        (b"Connection", b"keep-alive"),
    ],
    True,
    11,
    False,
)
UPSTREAM_BODY = rb.UPSTREAM_BODY.encode()


class _Transport:
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False


class _Protocol:
    """What aiohttp's BaseRequest reads of the connection that received it."""

    ssl_context = None
    peername = ("127.0.0.1", 40000)
    sockname = ("127.0.0.1", 8080)
    transport = _Transport()


class _Body:
    """The upstream connection as the one-write answer uses it: a body already read."""

    def take_body(self) -> bytes:
        return UPSTREAM_BODY


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="per variant [50000]")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"[{DEFAULT_VARIANTS}]")
    args = parser.parse_args()
    known = {v.name for v in rb.VARIANTS if not v.exhaust}
    args.variants = args.variants.split(",")
    if unknown := [name for name in args.variants if name not in known]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return args


def request_message(headers: dict[str, str]) -> RawRequestMessage:
    """The parsed head of `GET /v1/items` as aiohttp's parser hands it to the server."""
    message: RawRequestMessage = make_mocked_request("GET", rb.PATH, headers=headers)._message
    return message


async def measure(variant: rb.Variant, requests: int, work_dir: Path) -> dict[str, float]:
    """Median nanoseconds per stage of one variant's requests."""
    (work_dir / "shieldproxy.toml").write_text(variant.config)
    config = load_config(work_dir / "shieldproxy.toml", env={})
    store = open_store("local", data_dir=work_dir)
    limiter = RateLimiter(store, settings=LimiterSettings())  # the defaults, reserves on
    registry = KeyRegistry(store, KeyHasher(b"path-bench-key-secret"), config)
    headers = {"Host": "127.0.0.1:8080", "User-Agent": "wrk", "Accept": "*/*"}
    if variant.plan:
        tenant = await registry.create_tenant({"name": "bench", "plan": variant.plan})
        fields: dict[str, Any] = {"name": "bench", "tenant_id": tenant["id"]}
        if variant.key_limit:  # as the admin API stores it
            limit = Limit.model_validate(variant.key_limit)
            fields["rate_limits"] = [limit.model_dump()]
        _, secret = await registry.create_key(fields)
        headers["Authorization"] = f"Bearer {secret}"
    pipeline = Pipeline(default_checks(config, limiter, registry))
    forwarder = Forwarder(
        None,  # type: ignore[arg-type]  # no pool: nothing here connects
        URL("http://127.0.0.1:9"),
        ForwardSettings(max_body_bytes=0, body_timeout=30.0, preserve_host=False),
    )
    metrics = ProxyMetrics()
    message = request_message(headers)
    loop = asyncio.get_running_loop()
    protocol: Any = _Protocol()
    body: Any = _Body()
    samples: list[list[float]] = [[] for _ in STAGES]
    clock = time.perf_counter

    async def one() -> None:
        t0 = clock()
        request = web.BaseRequest(message, EMPTY_PAYLOAD, protocol, None, None, loop)  # type: ignore[arg-type]
        ctx = RequestContext(request, "req-1", t0)
        t1 = clock()
        decision = await pipeline.run(ctx)
        t2 = clock()
        if not decision.allowed:
            raise BenchError(f"{variant.name}: the pipeline denied ({decision.code})")
        forwarder._request_head(ctx)
        t3 = clock()
        if forwarder._whole(ctx, UPSTREAM_HEAD, body) is None:
            raise BenchError(f"{variant.name}: no one-write answer")
        t4 = clock()
        route = ctx.route.name if ctx.route is not None else UNMATCHED_ROUTE
        metrics.record(route, 200, "allow", "", t4 - t0)
        t5 = clock()
        for stage, (start, end) in enumerate(((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            samples[stage].append(end - start)

    # Warm-up: caches, the key's view, then the reserves of a busy subject. Requests come in
    # bursts of 64 (wrk's connections) with a loop turn between, as in the server.
    for i in range(max(requests, 3000)):
        await one()
        if i % 64 == 63:
            await asyncio.sleep(0)
    for stage_samples in samples:
        stage_samples.clear()
    for i in range(requests):
        await one()
        if i % 64 == 63:
            await asyncio.sleep(0)
    await limiter.close()
    await store.close()
    return {name: statistics.median(s) * 1e9 for name, s in zip(STAGES, samples, strict=True)}


def main() -> int:
    args = parse_args()
    variants = {v.name: v for v in rb.VARIANTS}
    print(f"our code per request, in process (median ns per stage of {args.requests:,} requests)")
    print(f"  {'variant':<11}" + "".join(f"{name:>14}" for name in STAGES) + f"{'total':>10}")
    totals: dict[str, float] = {}
    for name in args.variants:
        with tempfile.TemporaryDirectory(prefix="path-bench-") as work_dir:
            stages = asyncio.run(measure(variants[name], args.requests, Path(work_dir)))
        totals[name] = sum(stages.values())
        row = "".join(f"{stages[stage]:>14,.0f}" for stage in STAGES)
        print(f"  {name:<11}{row}{totals[name]:>10,.0f}")
    print()
    pairs: list[tuple[str, str]] = [("3-limits", "no-limits"), ("3-limits", "auth-only")]
    pairs += [("auth-only", "no-limits"), ("full-plan", "3-limits")]
    for top, bottom in pairs:
        if top in totals and bottom in totals:
            extra = totals[top] - totals[bottom]
            print(f"  {top} - {bottom}: {extra:+,.0f} ns ({totals[bottom] / totals[top]:.3f}x)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"path_bench: {exc}", file=sys.stderr)
        sys.exit(1)
