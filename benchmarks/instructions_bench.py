"""Instructions per request under valgrind's callgrind: the rate-limit ratios without VM noise.

    python benchmarks/instructions_bench.py [--duration 20] [--variants no-limits,3-limits]
                                            [--json out.json]

Why: on a shared VM, req/s swings by ±20 % between rounds of one run, which hides changes of
a few percent and makes a goal like "≥ 0.85x" a coin toss near the line. callgrind counts the
user-space instructions the proxy executes, the same for the same code and load whatever else
the machine does (repeat runs agree within about 2 %). It counts neither kernel time (the
socket syscalls) nor cache misses, so it measures the proxy's own work: a companion to
ratelimit_bench.py, whose wall-clock figures remain the goals of record.

Each variant of ratelimit_bench.py runs under callgrind, pinned to CPU 0; nginx, redis-server
and wrk run natively on CPU 1. After a warm-up the counters are zeroed, wrk drives 64
connections for --duration seconds, the counters are dumped, and instructions, less what the
instance runs idle over as long (its timers: see idle_rate), are divided by the requests wrk
counted. The proxy runs about 50x slower under callgrind, and a busy subject's reserve is
sized by its request rate over `reserve_seconds`; the horizon is scaled by that slowdown so
that a grant covers as many requests as at full speed, and so are the variants' one-minute
windows (see slowed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

# Run as a script: make the sibling modules importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ratelimit_bench as rb
from harness import (
    LOOPBACK,
    BenchError,
    Service,
    cpu_count,
    free_port,
    nginx_upstream,
    require_tools,
    scratch_dir,
    stop_service,
)

SLOWDOWN = 50  # how much slower the proxy runs under callgrind (measured: 40-60x)
RESERVE_SECONDS = 0.1 * SLOWDOWN  # the default horizon, scaled (see the docstring)
# The store's per-call budget, scaled the same way: a loop turn of queued requests takes 50x
# longer under callgrind, and a reply read after the default 50 ms would count as a timeout
# and send the instance to its fallback (not the path being measured).
STORE_TIMEOUT_S = 0.05 * SLOWDOWN
IDLE_S = 5.0  # how long the idle rate is measured (see idle_rate)
DEFAULT_VARIANTS = "no-limits,auth-only,3-limits,full-plan,flood-429"
_REQUESTS = re.compile(r"(\d+) requests in")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_EVENT = re.compile(r'^shieldproxy_ratelimit_events_total\{event="(\w+)"\}\s+([\d.e+]+)', re.M)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=20, help="measured seconds [20]")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"ratelimit_bench variants [{DEFAULT_VARIANTS}]",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    parser.add_argument(
        "--keep-dumps",
        type=Path,
        metavar="DIR",
        help="copy each variant's measured dump here as <variant>.callgrind (for callgrind_annotate)",
    )
    args = parser.parse_args()
    known = {v.name for v in rb.VARIANTS}
    args.variants = args.variants.split(",")
    if unknown := [name for name in args.variants if name not in known]:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return args


def callgrind_control(option: str, service: Service) -> None:
    done = subprocess.run(
        ["callgrind_control", option, str(service.pid)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"callgrind_control {option} failed: {done.stderr or done.stdout}")


def instructions_since_zero(dump: Path) -> int:
    """The Ir total of one dump."""
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise BenchError(f"{dump}: no summary line")


def limiter_events(admin: str, token: str) -> dict[str, int]:
    status, raw = rb.http(f"{admin}/metrics", token=token)
    if status != 200:
        raise BenchError(f"GET {admin}/metrics answered {status}")
    return {event: int(float(n)) for event, n in _EVENT.findall(raw.decode())}


def newest_dump(home: Path) -> Path:
    """The newest dump of an instance (callgrind_control -d writes callgrind.out.<n>)."""
    dumps = sorted(home.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise BenchError(f"no callgrind dump in {home}")
    return dumps[-1]


def idle_rate(service: Service, home: Path) -> float:
    """Instructions per second the instance runs with no requests: its timers (housekeeping,
    heartbeats, the key cache's flush, aiohttp's clock). Measured: about 0.3 M a second. At
    full speed that is nothing next to 10,000 requests a second, but under callgrind a second
    holds 50x fewer requests, and charging it to them added about 1k instructions (0.4 %) to
    each, more or less by how many requests a run happened to complete."""
    callgrind_control("-z", service)
    started = time.monotonic()
    time.sleep(IDLE_S)
    callgrind_control("-d", service)
    return instructions_since_zero(newest_dump(home)) / (time.monotonic() - started)


def slowed(variant: rb.Variant) -> rb.Variant:
    """The variant with its one-minute windows stretched by SLOWDOWN, as its horizon is. At each
    window's end a busy subject's reserves end with it, and its requests go to the store until
    the next grant lands: at full speed a few dozen per minute, but under callgrind the
    minute holds 50x fewer requests and the grant takes 50x longer, so whether a run happens
    to span a window's end moved the count by 2 % (2 % of the requests at twice the cost)."""
    stretched = f"window_seconds = {60 * SLOWDOWN}\n"
    return dataclasses.replace(
        variant, config=variant.config.replace("window_seconds = 60\n", stretched)
    )


def measure(
    variant: rb.Variant,
    upstream: str,
    store: str,
    work_dir: Path,
    duration: int,
    *,
    keep_dumps: Path | None = None,
) -> dict[str, float]:
    # callgrind writes its dumps into the instance's home (its working directory).
    service, url, admin, data_dir = rb.start_shieldproxy(
        slowed(variant),
        upstream,
        store,
        work_dir,
        wrapper=("valgrind", "--tool=callgrind", "--callgrind-out-file=callgrind.out"),
        extra_config=f"\n[rate_limits]\nreserve_seconds = {RESERVE_SECONDS}\n",
        extra_env={"SHIELDPROXY_STORE__TIMEOUT_SECONDS": str(STORE_TIMEOUT_S)},
        start_timeout=300,
    )
    try:
        token = (data_dir / "admin-token").read_text().strip()
        key = rb.make_key(variant, admin, token) if variant.plan else ""
        rb.check_answers(variant.name, url, key, exhaust=variant.exhaust)
        wrk = ["taskset", "-c", rb.LOAD_CPU, "wrk", "-t1", "-c64", "--timeout", "30s"]
        if key:
            wrk += ["-H", f"Authorization: Bearer {key}"]
        subprocess.run([*wrk, f"-d{max(3, duration // 3)}s", url], capture_output=True, check=True)
        time.sleep(1)
        before = limiter_events(admin, token)
        callgrind_control("-z", service)
        started = time.monotonic()
        out = subprocess.run(
            [*wrk, f"-d{duration}s", url], capture_output=True, text=True, check=True
        ).stdout
        time.sleep(2)  # requests still queued in the proxy finish inside the count
        callgrind_control("-d", service)
        loaded_s = time.monotonic() - started
        instructions = instructions_since_zero(dump := newest_dump(work_dir / variant.name))
        if keep_dumps is not None:
            keep_dumps.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dump, keep_dumps / f"{variant.name}.callgrind")
        time.sleep(1)
        after = limiter_events(admin, token)
        idle_per_s = idle_rate(service, work_dir / variant.name)
        match = _REQUESTS.search(out)
        if match is None:
            raise BenchError(f"{variant.name}: cannot read wrk's output:\n{out}")
        requests = int(match.group(1))
        non_2xx = _NON_2XX.search(out)
        denied = int(non_2xx.group(1)) if non_2xx is not None else 0
        if denied != (requests if variant.exhaust else 0):
            expected = "429" if variant.exhaust else "2xx"
            raise BenchError(f"{variant.name}: {denied} of {requests} answers were not {expected}")
        if (errors := after.get("store_errors", 0) - before.get("store_errors", 0)) > 0:
            raise BenchError(
                f"{variant.name}: {errors} store calls failed while measuring (the fallback "
                "was measured, not the store path): is the machine too busy for callgrind?"
            )
        checks = after.get("checks", 0) - before.get("checks", 0)
        reserved = after.get("reserved", 0) - before.get("reserved", 0)
        background = idle_per_s * loaded_s
        return {
            "requests": requests,
            "instructions": instructions,
            "idle_per_second": idle_per_s,
            "per_request": (instructions - background) / requests,
            "reserved_share": reserved / checks if checks else 0.0,
        }
    finally:
        stop_service(service)


def main() -> int:
    args = parse_args()
    rb.HTTP_TIMEOUT_S = 5.0 * SLOWDOWN  # setup requests are answered 50x slower too
    require_tools("valgrind", "callgrind_control", "wrk", "nginx", "taskset", "redis-server")
    if cpu_count() < 2:
        raise BenchError("needs at least 2 CPUs (proxy on one, wrk + nginx + redis on the other)")
    print(f"instructions per request under callgrind: wrk -t1 -c64, {args.duration}s per variant")
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        work_dir = stack.enter_context(scratch_dir("instructions-bench-"))
        upstream_port = free_port()
        upstream = f"http://{LOOPBACK}:{upstream_port}"
        stack.enter_context(
            nginx_upstream(upstream_port, rb.UPSTREAM_BODY, cpus=rb.LOAD_CPU, work_dir=work_dir)
        )
        redis_service, client = rb.start_redis(work_dir)
        stack.callback(stop_service, redis_service)
        store = f"redis://{LOOPBACK}:{client.connection_pool.connection_kwargs['port']}/0"
        variants = {v.name: v for v in rb.VARIANTS}
        for name in args.variants:
            results[name] = measure(
                variants[name], upstream, store, work_dir, args.duration, keep_dumps=args.keep_dumps
            )
            r = results[name]
            print(
                f"  {name:<11} {r['requests']:>7,.0f} requests  {r['per_request']:>9,.0f} "
                f"instructions/request  ({r['reserved_share']:.0%} of limit checks from reserves;"
                f" idle {r['idle_per_second'] / 1e6:.1f} M/s subtracted)"
            )
    print()
    print("as throughput ratios (instructions per request of the second / of the first):")
    ratios = {}
    for top, bottom in (
        ("3-limits", "no-limits"),
        ("3-limits", "auth-only"),
        ("auth-only", "no-limits"),
        ("full-plan", "3-limits"),
        ("flood-429", "3-limits"),
    ):
        if top in results and bottom in results:
            label = f"{top} / {bottom}"
            ratios[label] = results[bottom]["per_request"] / results[top]["per_request"]
            print(f"  {label:<24} {ratios[label]:.3f}x")
    if args.json:
        payload = {"benchmark": "instructions_per_request", "results": results, "ratios": ratios}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"instructions_bench: {exc}", file=sys.stderr)
        sys.exit(1)
