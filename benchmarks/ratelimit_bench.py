"""Rate-limit benchmark: shieldproxy's limits on Redis against no limits and a FastAPI peer.

    python benchmarks/ratelimit_bench.py [--duration 10] [--runs 3] [--connections 64]
                                         [--warmup 2] [--json out.json]

Issue goals, all ratios within one invocation (see benchmarks/README.md):
three limits (key, ip, route) on Redis keep ≥ 85 % of the no-limit throughput and ≥ 3x the
peer's; at most one Redis call per allowed request; over-limit floods answered ≥ 2x faster
with no Redis limit call; the full plan path (tenant + key + ip + route + quota) within 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis

# Run as a script: make the sibling `harness` module importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    LOOPBACK,
    START_TIMEOUT_S,
    BenchError,
    Service,
    Target,
    WrkLoad,
    WrkResult,
    background_cpu_percent,
    cpu_count,
    finish_run,
    fmt_ms,
    free_port,
    nginx_upstream,
    per_round_ratios,
    print_table,
    ratio,
    require_tools,
    run_wrk,
    scratch_dir,
    start_service,
    stop_service,
    wait_for_http,
)

from shieldproxy.store.scripts import load_script

UPSTREAM_BODY = '{"ok":true}'
PATH = "/v1/items"
PROXY_CPU = "0"  # the proxy under test owns one core...
LOAD_CPU = "1"  # ...wrk, nginx and redis-server share the other
NEVER = 10**9  # a limit this high never denies within a benchmark
NOISE_PERCENT = 5.0
SETTLE_S = 1.0
GOAL_VS_NO_LIMITS = 0.85
GOAL_VS_PEER = 3.0
GOAL_CALLS_PER_REQUEST = 1.0
GOAL_FLOOD = 2.0
GOAL_FULL = 0.90
# Per setup request (keys, checks, metrics); instructions_bench.py raises it under callgrind.
HTTP_TIMEOUT_S = 5.0
# Commands that make Redis run a script: the only way shieldproxy talks to Redis per request.
SCRIPT_COMMANDS = ("evalsha", "evalsha_ro", "eval", "eval_ro", "fcall", "fcall_ro")
ROUTE = '[[routes]]\nname = "items"\npath = "/v1/*"\nauth = true\n'


def _limit(name: str, scope: str, requests: int, window_s: int) -> str:
    return (
        f'[[limits]]\nname = "{name}"\nscope = "{scope}"\nstrategy = "sliding_window"\n'
        f"requests = {requests}\nwindow_seconds = {window_s}\n"
    )


def _store(prefix: str) -> str:
    # One prefix per instance: they share one Redis, and each has its own key secret.
    return f'[store]\nprefix = "{prefix}"\n'


PLAN_BASIC = "[plans.basic]\n"
PLAN_FULL = (
    "[plans.full]\nmonthly_quota = 1000000000000\n"
    f'limits = [{{ name = "plan-tenant", scope = "tenant", requests = {NEVER}, window_seconds = 60 }}]\n'
)


@dataclass(frozen=True)
class Variant:
    """One shieldproxy instance: its config, and how to make its API key (None = no auth)."""

    name: str
    config: str
    plan: str | None = None
    key_limit: dict[str, Any] | None = None  # the key's own rate limit (admin API)
    exhaust: bool = False  # spend the key limit before measuring (the flood)


VARIANTS = (
    Variant("no-limits", "[auth]\nrequired = false\n" + _store("a:")),
    # Not a goal: the same key and route as 3-limits without the limits, so that the limits'
    # own cost can be told apart from authentication's (issue 4 added keys to the 3-limit path).
    Variant("auth-only", _store("g:") + PLAN_BASIC + ROUTE, plan="basic"),
    Variant(
        "3-limits",
        _store("b:")
        + PLAN_BASIC
        + ROUTE
        + _limit("per-key", "key", NEVER, 60)
        + _limit("per-ip", "ip", NEVER, 60)
        + _limit("per-route", "route", NEVER, 60),
        plan="basic",
    ),
    Variant(
        "full-plan",
        _store("f:")
        + PLAN_FULL
        + ROUTE
        + _limit("per-ip", "ip", NEVER, 60)
        + _limit("per-route", "route", NEVER, 60),
        plan="full",
        key_limit={"strategy": "sliding_window", "requests": NEVER, "window_seconds": 60},
    ),
    Variant(
        "flood-429",
        _store("e:")
        + PLAN_BASIC
        + ROUTE
        # Spent before measuring, and never admitting again within a run: a window of 30
        # days (an hour-long one, crossed during a run, admitted a request there).
        + _limit("per-key", "key", 10, 30 * 86_400)
        + _limit("per-ip", "ip", NEVER, 60)
        + _limit("per-route", "route", NEVER, 60),
        plan="basic",
        exhaust=True,
    ),
)


@dataclass(frozen=True)
class HeaderLoad(WrkLoad):
    """wrk with request headers (`-H`): the API key rides on every request."""

    headers: tuple[str, ...] = ()

    def argv(self, url: str, duration_s: int | None = None) -> list[str]:
        command = super().argv(url, duration_s)
        extra = [arg for header in self.headers for arg in ("-H", header)]
        return [*command[:-1], *extra, command[-1]]  # the URL stays last


@dataclass
class Bench:
    """A target plus what it needs per run: its wrk load, Redis deltas, its admin access."""

    target: Target
    load: WrkLoad
    expect_429: bool = False
    admin: tuple[str, str] | None = None  # (admin base URL, admin token) for /metrics
    commands: list[Counter[str]] = field(default_factory=list)  # Redis commandstats deltas
    statuses: list[Counter[str]] = field(default_factory=list)  # proxy's own status classes
    slowlog: list[Counter[str]] = field(default_factory=list)  # top-level calls (flood only)
    valid: list[bool] = field(default_factory=list)  # per run, see run_valid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run [10]")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections [64]")
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds; median [3]")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per target [2]")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results here")
    return parser.parse_args()


# -- services -----------------------------------------------------------------------------


def start_redis(work_dir: Path) -> tuple[Service, redis.Redis]:
    port = free_port()
    argv = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        LOOPBACK,
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    argv += ["--dir", str(work_dir)]
    service = start_service("redis", argv, cpus=LOAD_CPU, log_dir=work_dir)
    client = redis.Redis(host=LOOPBACK, port=port, decode_responses=True)
    for _ in range(100):
        try:
            client.ping()
            return service, client
        except redis.ConnectionError:
            if service.process.poll() is not None:
                break
            time.sleep(0.1)
    raise BenchError(f"redis-server did not start:\n{service.log_tail()}")


def _env() -> dict[str, str]:
    # Our own settings only: a SHIELDPROXY_* variable in the caller's shell would change
    # what is measured.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIELDPROXY_")}
    repo = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    return env


def start_shieldproxy(
    variant: Variant,
    upstream: str,
    store: str,
    work_dir: Path,
    *,
    wrapper: Sequence[str] = (),
    extra_config: str = "",
    extra_env: Mapping[str, str] | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> tuple[Service, str, str, Path]:
    """One pinned instance; returns (service, proxy URL, admin URL, data dir).

    `wrapper` runs it under another program (instructions_bench.py: valgrind), in the
    instance's home directory, with `extra_config` appended to the variant's and
    `extra_env` (SHIELDPROXY_* settings the variant's own tables already name) set."""
    home = work_dir / variant.name
    home.mkdir()
    config = home / "shieldproxy.toml"
    config.write_text(variant.config + extra_config)
    port, admin_port = free_port(), free_port()
    argv = [*wrapper, sys.executable, "-m", "shieldproxy.cli", "serve", "--config", str(config)]
    argv += ["--upstream", upstream, "--listen", f"{LOOPBACK}:{port}", "--store", store]
    argv += ["--admin-listen", f"{LOOPBACK}:{admin_port}", "--data-dir", str(home / "data")]
    argv += ["--log-level", "warning"]
    service = start_service(
        variant.name,
        argv,
        cpus=PROXY_CPU,
        log_dir=work_dir,
        env=_env() | dict(extra_env or {}),
        cwd=home,
    )
    admin = f"http://{LOOPBACK}:{admin_port}"
    wait_for_http(service, f"{admin}/healthz", timeout=start_timeout)
    return service, f"http://{LOOPBACK}:{port}{PATH}", admin, home / "data"


def start_peer(upstream: str, store: str, work_dir: Path) -> tuple[Service, str]:
    port = free_port()
    script = Path(__file__).resolve().parent / "peer_fastapi.py"
    argv = [sys.executable, str(script), "--upstream", upstream, "--redis", store]
    argv += ["--listen", f"{LOOPBACK}:{port}", "--limit", str(NEVER)]
    return start_service(
        "peer", argv, cpus=PROXY_CPU, log_dir=work_dir
    ), f"http://{LOOPBACK}:{port}{PATH}"


def http(url: str, *, token: str = "", body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    """One request; (status, body) for any HTTP status, so 401/429 are answers, not errors."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def make_key(variant: Variant, admin: str, token: str) -> str:
    """A tenant on the variant's plan and a key for it, through the admin API like an operator."""
    status, raw = http(
        f"{admin}/v1/tenants", token=token, body={"name": "bench", "plan": variant.plan}
    )
    if status != 201:
        raise BenchError(f"{variant.name}: POST /v1/tenants answered {status}: {raw[:300]!r}")
    body: dict[str, Any] = {"name": "bench", "tenant_id": json.loads(raw)["id"]}
    if variant.key_limit:
        body["rate_limit"] = variant.key_limit
    status, raw = http(f"{admin}/v1/keys", token=token, body=body)
    if status != 201:
        raise BenchError(f"{variant.name}: POST /v1/keys answered {status}: {raw[:300]!r}")
    secret: str = json.loads(raw)["key"]
    return secret


def check_answers(name: str, url: str, key: str, *, exhaust: bool) -> None:
    """The proxy must forward nginx's exact body; a flood key must end up denied with 429."""
    for _ in range(20 if exhaust else 1):
        status, body = http(url, token=key)
        if status == 429 and exhaust:
            return
        if status != 200 or body.decode() != UPSTREAM_BODY:
            raise BenchError(f"{name} answered {status} {body[:200]!r}, not the upstream's body")
    if exhaust:
        raise BenchError(f"{name}: the key limit never denied (expected 429 after 10 requests)")


# -- Redis and proxy counters -------------------------------------------------------------


def commandstats(client: redis.Redis) -> Counter[str]:
    info: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()})


_METRIC = re.compile(
    r'^shieldproxy_requests_total\{[^}]*status_class="(\w+)"[^}]*\}\s+([\d.e+]+)', re.M
)


def status_classes(admin: str, token: str) -> Counter[str]:
    """Responses by status class as shieldproxy counted them (wrk only knows "non-2xx")."""
    status, raw = http(f"{admin}/metrics", token=token)
    if status != 200:
        raise BenchError(f"GET {admin}/metrics answered {status}")
    out: Counter[str] = Counter()
    for klass, value in _METRIC.findall(raw.decode()):
        out[klass] += int(float(value))
    return out


def _text(value: str | bytes) -> str:
    """redis-py returns slowlog fields as bytes even with decode_responses."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def top_level_calls(client: redis.Redis, names: dict[str, str]) -> Counter[str]:
    """Classify the slowlog's client-issued commands; script-internal ones come from "?:0".

    commandstats cannot tell a heartbeat EVALSHA from a limit EVALSHA, nor a command a client
    sent from one a script ran, so during the (quiet) flood every command is logged instead.
    """
    out: Counter[str] = Counter()
    for entry in client.slowlog_get(100_000):  # type: ignore[union-attr]
        address = _text(entry.get("client_address", ""))
        if address in ("", "?:0", "?"):
            continue
        words = _text(entry["command"]).split()
        command = words[0].lower() if words else "?"
        if command in ("slowlog", "config", "info"):
            continue  # the benchmark's own probes
        if command in SCRIPT_COMMANDS and len(words) > 1:
            command = f"{command} {names.get(words[1], 'other script')}"
        out[command] += 1
    return out


def run_bench(bench: Bench, client: redis.Redis, scripts: dict[str, str]) -> WrkResult:
    """One wrk run with Redis and proxy counters read around it."""
    if bench.expect_429:
        client.config_set("slowlog-max-len", 100_000)
        client.slowlog_reset()
        client.config_set("slowlog-log-slower-than", 0)
    before = commandstats(client)
    statuses = status_classes(*bench.admin) if bench.admin else Counter()
    result = run_wrk(bench.load, bench.target.url)
    # Requests still queued in the proxy when wrk stops finish during this pause, so their
    # Redis calls are counted here and not in the next target's run.
    time.sleep(SETTLE_S)
    bench.commands.append(commandstats(client) - before)
    if bench.admin:
        bench.statuses.append(status_classes(*bench.admin) - statuses)
    if bench.expect_429:
        client.config_set("slowlog-log-slower-than", 10_000)
        bench.slowlog.append(top_level_calls(client, scripts))
    return result


# -- report -------------------------------------------------------------------------------


def script_calls(delta: Counter[str]) -> int:
    return sum(delta[name] for name in SCRIPT_COMMANDS)


def run_valid(bench: Bench, result: WrkResult) -> bool:
    """No socket errors; all 2xx, or for the flood all 4xx as shieldproxy itself counted them
    (wrk only knows "non-2xx", which would also hide 5xx)."""
    if not bench.expect_429:
        return result.valid
    statuses = bench.statuses[-1]
    other = sum(n for klass, n in statuses.items() if klass != "4xx")
    return result.errors == 0 and result.requests > 0 and other == 0 and statuses["4xx"] > 0


def requirement(
    label: str,
    value: float,
    goal: float,
    unit: str,
    spread: list[float] | None,
    *,
    at_most: bool = False,
) -> bool:
    met = value <= goal if at_most else value >= goal
    rounds = f" (rounds {min(spread):.2f}-{max(spread):.2f})" if spread else ""
    sign = "≤" if at_most else "≥"
    print(
        f"{label:<44} {value:6.2f}{unit}{rounds:<22} goal {sign} {goal}{unit}: {'MET' if met else 'NOT MET'}"
    )
    return met


def report(benches: dict[str, Bench]) -> dict[str, Any]:
    targets = [b.target for b in benches.values()]
    print()
    print_table(targets)
    print()
    print(
        "Redis commands during the measured runs (commandstats; counts commands run inside scripts too):"
    )
    for name, bench in benches.items():
        requests = sum(r.requests for r in bench.target.runs)
        total: Counter[str] = sum(bench.commands, Counter())
        per_request = ", ".join(
            f"{cmd} {n / requests:.3f}"
            for cmd, n in total.most_common()
            if cmd not in ("info", "slowlog", "config")
        )
        print(f"  {name:<11} per request: {per_request or 'none'}")
    flood = benches["flood-429"]
    top: Counter[str] = sum(flood.slowlog, Counter())
    seconds = len(flood.target.runs) * flood.load.duration_s
    print("client-issued Redis calls during the flood (slowlog, all instances):")
    for cmd, n in top.most_common() or [("none", 0)]:
        print(f"  {cmd:<34} {n:>6}  ({n / seconds:.2f}/s)")
    heartbeats_per_s = top["evalsha heartbeat"] / seconds if seconds else 0.0

    a, b, f, peer = (benches[n].target for n in ("no-limits", "3-limits", "full-plan", "peer"))
    rps = {t.name: t.median().requests_per_s for t in targets}
    b_requests = sum(r.requests for r in b.runs)
    b_calls = sum(script_calls(d) for d in benches["3-limits"].commands)
    b_seconds = len(b.runs) * benches["3-limits"].load.duration_s
    b_heartbeats = heartbeats_per_s * b_seconds
    calls_per_request = ratio(b_calls - b_heartbeats, b_requests)
    flood_limit_calls = top["evalsha limits"] + sum(
        n
        for cmd, n in top.items()
        if cmd.split()[0] in SCRIPT_COMMANDS and "heartbeat" not in cmd and cmd != "evalsha limits"
    )
    print()
    print(
        f"3-limits script calls: {b_calls} for {b_requests} requests "
        f"(≈{b_heartbeats:.0f} of them heartbeats of the {len(VARIANTS)} instances, subtracted)"
    )
    results = {
        "3-limits / no-limits req/s": requirement(
            "3-limits / no-limits req/s",
            ratio(rps["3-limits"], rps["no-limits"]),
            GOAL_VS_NO_LIMITS,
            "x",
            per_round_ratios(b, a, "requests_per_s"),
        ),
        "3-limits / peer req/s": requirement(
            "3-limits / peer (FastAPI) req/s",
            ratio(rps["3-limits"], rps["peer"]),
            GOAL_VS_PEER,
            "x",
            per_round_ratios(b, peer, "requests_per_s"),
        ),
        "Redis calls per allowed request": requirement(
            "3-limits Redis calls per allowed request",
            calls_per_request,
            GOAL_CALLS_PER_REQUEST,
            "",
            None,
            at_most=True,
        ),
        "flood / 3-limits req/s": requirement(
            "flood (429) / 3-limits req/s",
            ratio(rps["flood-429"], rps["3-limits"]),
            GOAL_FLOOD,
            "x",
            per_round_ratios(flood.target, b, "requests_per_s"),
        ),
        "flood Redis limit calls": requirement(
            "flood Redis limit calls (heartbeats excluded)",
            float(flood_limit_calls),
            0.0,
            "",
            None,
            at_most=True,
        ),
        "full-plan / 3-limits req/s": requirement(
            "full-plan / 3-limits req/s",
            ratio(rps["full-plan"], rps["3-limits"]),
            GOAL_FULL,
            "x",
            per_round_ratios(f, b, "requests_per_s"),
        ),
    }
    print(
        f"{'3-limits / auth-only req/s (informational)':<44} "
        f"{ratio(rps['3-limits'], rps['auth-only']):6.2f}x"
        "  the limits' own cost: same key and route, no limits"
    )
    print(
        f"{'auth-only / no-limits req/s (informational)':<44} "
        f"{ratio(rps['auth-only'], rps['no-limits']):6.2f}x"
        "  what a cached API key costs"
    )
    instructions = {t.name: t.median().instructions_per_request for t in targets}
    for top_name, bottom_name in (
        ("3-limits", "no-limits"),
        ("flood-429", "3-limits"),
        ("3-limits", "auth-only"),
    ):
        top_count, bottom_count = instructions[top_name], instructions[bottom_name]
        if top_count and bottom_count:
            label = f"{top_name} / {bottom_name} instructions (informational)"
            print(
                f"{label:<44} {ratio(bottom_count, top_count):6.2f}x"
                "  per request, inverted to read like req/s; not moved by a noisy VM"
            )
    print(
        f"flood heartbeats: {top['evalsha heartbeat']} in {seconds}s ({heartbeats_per_s:.2f}/s, all instances)"
    )
    return {
        "requirements_met": results,
        "calls_per_allowed_request": calls_per_request,
        "flood_top_level_calls": dict(top),
        "commands": {n: [dict(d) for d in b.commands] for n, b in benches.items()},
    }


# -- main ---------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    require_tools("wrk", "nginx", "taskset", "redis-server")
    if cpu_count() < 2:
        raise BenchError("needs at least 2 CPUs (proxy on one, wrk + nginx + redis on the other)")
    print(
        f"rate limits on Redis: wrk -t1 -c{args.connections}, {args.duration}s x {args.runs} rounds, median"
    )
    print(
        f"pinning: proxy under test (shieldproxy or peer) on CPU {PROXY_CPU}; wrk + nginx + redis-server on CPU {LOAD_CPU}"
    )
    busy = background_cpu_percent()
    if busy > NOISE_PERCENT:
        print(f"WARNING: machine already {busy:.0f}% busy before the run; expect noisy rounds")
    scripts = {load_script(n).sha: n for n in ("limits", "heartbeat")}
    services: list[Service] = []
    with ExitStack() as stack:
        work_dir = stack.enter_context(scratch_dir("ratelimit-bench-"))
        upstream_port = free_port()
        upstream = f"http://{LOOPBACK}:{upstream_port}"
        services.append(
            stack.enter_context(
                nginx_upstream(upstream_port, UPSTREAM_BODY, cpus=LOAD_CPU, work_dir=work_dir)
            )
        )
        redis_service, client = start_redis(work_dir)
        stack.callback(stop_service, redis_service)
        services.append(redis_service)
        store = f"redis://{LOOPBACK}:{client.connection_pool.connection_kwargs['port']}/0"
        base = {"connections": args.connections, "duration_s": args.duration, "cpus": LOAD_CPU}
        benches: dict[str, Bench] = {}
        for variant in VARIANTS:
            service, url, admin, data_dir = start_shieldproxy(variant, upstream, store, work_dir)
            stack.callback(stop_service, service)
            services.append(service)
            token = (data_dir / "admin-token").read_text().strip()
            key = make_key(variant, admin, token) if variant.plan else ""
            check_answers(variant.name, url, key, exhaust=variant.exhaust)
            headers = (f"Authorization: Bearer {key}",) if key else ()
            benches[variant.name] = Bench(
                Target(variant.name, url, service.pid),
                HeaderLoad(**base, headers=headers),
                expect_429=variant.exhaust,
                admin=(admin, token),
            )
        peer, peer_url = start_peer(upstream, store, work_dir)
        stack.callback(stop_service, peer)
        services.append(peer)
        wait_for_http(peer, peer_url)
        benches["peer"] = Bench(
            Target("peer", peer_url, peer.pid),
            HeaderLoad(**base, headers=("Authorization: Bearer peer-key",)),
        )
        order = ["no-limits", "auth-only", "3-limits", "full-plan", "peer", "flood-429"]
        benches = {name: benches[name] for name in order}
        run_all(benches, client, scripts, args)
        problems = []
        for service in reversed(services):
            stop_service(service)  # stopping is part of the run: a traceback here counts too
            problems += [f"{service.name}: {line}" for line in service.log_problems()]
    summary = report(benches)
    invalid = [name for name, b in benches.items() if not all(b.valid)]
    return finish_run(
        args,
        benchmark="rate_limits_redis",
        pinning={"proxy": PROXY_CPU, "load": LOAD_CPU},
        targets=[b.target.as_json() for b in benches.values()],
        summary=summary,
        busy=busy,
        invalid=invalid,
        problems=problems,
        what="socket errors or unexpected statuses",
    )


def run_all(
    benches: dict[str, Bench],
    client: redis.Redis,
    scripts: dict[str, str],
    args: argparse.Namespace,
) -> None:
    """Warm up, then interleaved rounds, reading counters around every measured run."""
    for name, bench in benches.items():
        if args.warmup > 0:
            print(f"  warm-up {name} ({args.warmup}s)")
            run_wrk(bench.load, bench.target.url, args.warmup)
    log: Callable[[str], None] = print
    for round_no in range(1, args.runs + 1):
        for name, bench in benches.items():
            result = bench.target.measure(partial(run_bench, bench, client, scripts))
            bench.target.runs.append(result)
            ok = run_valid(bench, result)
            bench.valid.append(ok)
            log(
                f"  round {round_no}/{args.runs} {name:<10} {result.requests_per_s:>9,.0f} req/s"
                f"  p50 {fmt_ms(result.p50_ms)}  p99 {fmt_ms(result.p99_ms)}"
                f"  redis {script_calls(bench.commands[-1]) / max(1, result.requests):.3f} scripts/req"
                + ("" if ok else "  << errors!")
            )
    for bench in benches.values():
        bench.target.sample_rss()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"ratelimit_bench: {exc}", file=sys.stderr)
        sys.exit(1)
