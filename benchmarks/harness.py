"""Shared benchmark plumbing: processes, ports, an nginx upstream, wrk runs, RSS and tables.

Every benchmark in this folder compares a target against a baseline measured in the
same invocation, so the helpers here care about repeatability (CPU pinning, warm-up,
interleaved rounds, medians) more than about absolute numbers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
_PROBLEM = re.compile(r"Traceback|\bERROR\b|\[(error|crit|alert|emerg)\]")


class BenchError(RuntimeError):
    """A prerequisite or a process the benchmark needs is missing or broken."""


def require_tools(*names: str) -> None:
    """Fail with one clear line per missing command instead of a traceback mid-run."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        hints = {"wrk": "apt-get install wrk", "nginx": "apt-get install nginx-light"}
        lines = [
            f"missing prerequisite: {name} ({hints.get(name, 'not on PATH')})" for name in missing
        ]
        raise BenchError("\n".join(lines))


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel picks it, so no guessing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


# -- processes ------------------------------------------------------------------------


@dataclass
class Service:
    """A child process the benchmark started; `cpus` is its taskset list, or None."""

    name: str
    process: subprocess.Popen[bytes]
    cpus: str | None
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_problems(self) -> list[str]:
        """Tracebacks or error lines the service logged: a valid run has none."""
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return [line for line in text.splitlines() if _PROBLEM.search(line)]
        return []

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_service(
    name: str,
    argv: Sequence[str],
    *,
    cpus: str | None,
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Service:
    """Start `argv`, pinned with taskset when `cpus` is given; output goes to a log file.

    taskset execs the command, so the Popen pid is the service's own pid (RSS reads it).
    """
    command = ["taskset", "-c", cpus, *argv] if cpus is not None else list(argv)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    return Service(name, process, cpus, log_path)


def stop_service(service: Service, timeout: float = 10.0) -> None:
    """SIGTERM the service's process group (workers included); SIGKILL if it lingers."""
    process = service.process
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# A start takes about 0.5 s, but over 15 s on a starved VM (processes stalled for up to 0.8 s at
# a time). A process that exits still fails the wait at once.
START_TIMEOUT_S = 60.0


def wait_for_http(service: Service, url: str, timeout: float = START_TIMEOUT_S) -> bytes:
    """Poll `url` until it answers 200; returns the body. Fails early if the process died."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise BenchError(
                f"{service.name} exited with code {service.process.returncode}:\n"
                f"{service.log_tail()}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2.0) as response:
                body: bytes = response.read()
                if response.status == 200:
                    return body
                last_error = f"status {response.status}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{service.name} did not answer {url} in {timeout:.0f}s ({last_error})")


@contextlib.contextmanager
def nginx_upstream(port: int, body: str, *, cpus: str | None, work_dir: Path) -> Iterator[Service]:
    """nginx answering every request with a fixed small JSON body: a near-free upstream.

    One worker, no access log, generous keep-alive so proxies reuse their connections.
    """
    prefix = work_dir / "nginx"
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    escaped = body.replace("\\", "\\\\").replace("'", "\\'")
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{escaped}'; }}
    }}
}}
"""
    )
    service = start_service(
        "nginx", ["nginx", "-p", str(prefix), "-c", str(conf)], cpus=cpus, log_dir=work_dir
    )
    try:
        wait_for_http(service, f"http://{LOOPBACK}:{port}/")
        yield service
    finally:
        stop_service(service)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        yield Path(name)


# -- noise ----------------------------------------------------------------------------


def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from the first line of /proc/stat."""
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def background_cpu_percent(seconds: float = 1.0) -> float:
    """How busy the machine is before we start: the benchmark has 2 cores and needs both.

    Anything above a few percent (test suites, builds) lands on our pinned CPUs and makes
    rounds disagree; the caller warns instead of silently reporting noisy ratios.
    """
    busy_before, total_before = _cpu_jiffies()
    time.sleep(seconds)
    busy_after, total_after = _cpu_jiffies()
    return 100.0 * ratio(busy_after - busy_before, total_after - total_before)


# -- memory ---------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # Field 4 is the parent pid; the command name (field 2) may contain spaces.
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _tree(pid: int, include_children: bool) -> Iterator[int]:
    """`pid`, then (when asked) its descendants: a supervisor and its workers."""
    pending = [pid]
    while pending:
        current = pending.pop()
        yield current
        if include_children:
            pending.extend(_children(current))


def cpu_seconds(pid: int, *, include_children: bool = False) -> float:
    """User + system CPU time `pid` (plus its descendants) has used so far."""
    ticks = 0
    for current in _tree(pid, include_children):
        with contextlib.suppress(OSError):
            # Fields 14 and 15 (utime, stime); the command name (field 2) may contain spaces.
            after_name = Path(f"/proc/{current}/stat").read_text().rpartition(")")[2].split()
            ticks += int(after_name[11]) + int(after_name[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, *, include_children: bool = False) -> int:
    """VmRSS of `pid` (plus its descendants, for a supervisor with workers), in KiB."""
    total = 0
    for current in _tree(pid, include_children):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


# -- wrk ------------------------------------------------------------------------------

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in milliseconds; errors are wrk's socket error total."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    non_2xx: int
    # CPU time (user + system) the target's process spent per request during the run, when the
    # target has a process of ours: what its throughput would be bound by on a quiet core.
    cpu_us_per_request: float | None = None
    # Instructions its process retired per request (user + kernel), from `perf stat`, when
    # perf can count them here (see InstructionCounter): the figure a noisy VM cannot move.
    instructions_per_request: float | None = None

    @property
    def valid(self) -> bool:
        return self.errors == 0 and self.non_2xx == 0 and self.requests > 0


def parse_wrk(output: str) -> WrkResult:
    """Pull the figures we report out of `wrk --latency` text output."""
    percentiles = {
        int(m.group(1)): float(m.group(2)) * _UNIT_MS[m.group(3)]
        for m in _PERCENTILE.finditer(output)
    }
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    if rps is None or total is None or 50 not in percentiles or 99 not in percentiles:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    socket_errors = _SOCKET_ERRORS.search(output)
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests_per_s=float(rps.group(1)),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        requests=int(total.group(1)),
        errors=sum(int(n) for n in socket_errors.groups()) if socket_errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


@dataclass(frozen=True)
class WrkLoad:
    """What wrk sends: fixed threads, connections and duration for every target."""

    connections: int
    duration_s: int
    threads: int = 1
    cpus: str | None = None

    def argv(self, url: str, duration_s: int | None = None) -> list[str]:
        seconds = self.duration_s if duration_s is None else duration_s
        command = ["wrk", f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds}s"]
        command += ["--latency", url]
        return ["taskset", "-c", self.cpus, *command] if self.cpus is not None else command


def run_wrk(load: WrkLoad, url: str, duration_s: int | None = None) -> WrkResult:
    seconds = load.duration_s if duration_s is None else duration_s
    completed = subprocess.run(
        load.argv(url, duration_s),
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    if completed.returncode != 0:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()}")
    return parse_wrk(completed.stdout)


# -- results --------------------------------------------------------------------------


@dataclass
class Target:
    """One thing wrk drives; `rss_pid` is the process whose memory we report (or None)."""

    name: str
    url: str
    rss_pid: int | None = None
    rss_children: bool = False
    runs: list[WrkResult] = field(default_factory=list)
    rss_kib: int | None = None

    def median(self) -> WrkResult:
        """Per-metric median over the runs; error counts are summed (any error spoils it)."""
        runs = self.runs
        cpu = [r.cpu_us_per_request for r in runs if r.cpu_us_per_request is not None]
        counted = [r.instructions_per_request for r in runs if r.instructions_per_request]
        return WrkResult(
            requests_per_s=statistics.median(r.requests_per_s for r in runs),
            p50_ms=statistics.median(r.p50_ms for r in runs),
            p99_ms=statistics.median(r.p99_ms for r in runs),
            requests=sum(r.requests for r in runs),
            errors=sum(r.errors for r in runs),
            non_2xx=sum(r.non_2xx for r in runs),
            cpu_us_per_request=statistics.median(cpu) if cpu else None,
            # Only when every run was counted: a median of some rounds is not comparable.
            instructions_per_request=(
                statistics.median(counted) if counted and len(counted) == len(runs) else None
            ),
        )

    def measure(self, run: Callable[[], WrkResult]) -> WrkResult:
        """`run()` (one wrk run, and whatever the caller reads around it), with the CPU time
        and, where perf can count them, the instructions our process spent on it per request."""
        if self.rss_pid is None:
            return run()
        counter = None if self.rss_children else InstructionCounter.start(self.rss_pid)
        try:
            before = cpu_seconds(self.rss_pid, include_children=self.rss_children)
            result = run()
            spent = cpu_seconds(self.rss_pid, include_children=self.rss_children) - before
        finally:
            instructions = counter.stop() if counter is not None else None
        if not result.requests:
            return result
        return replace(
            result,
            cpu_us_per_request=spent * 1e6 / result.requests,
            instructions_per_request=(
                instructions / result.requests if instructions is not None else None
            ),
        )

    def sample_rss(self) -> None:
        if self.rss_pid is not None:
            self.rss_kib = rss_kib(self.rss_pid, include_children=self.rss_children)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "median": asdict(self.median()),
            "runs": [asdict(run) for run in self.runs],
            "rss_kib": self.rss_kib,
        }


class InstructionCounter:
    """`perf stat` counting one process's retired instructions (user and kernel) meanwhile.

    Why: on a shared VM the time a request takes moves with the neighbours (seen here: the
    same build measured 40 and 55 µs of CPU per request an hour apart), while the
    instructions it executes do not (the same runs: within 0.5 %). Ratios of instructions are
    what a change to the code can be judged by when time cannot; the goals stay in req/s.
    """

    def __init__(self, process: subprocess.Popen[bytes], output: Path) -> None:
        self._process = process
        self._output = output

    @classmethod
    def start(cls, pid: int) -> InstructionCounter | None:
        """Counting from now on, or None where perf is missing or may not count here."""
        perf = shutil.which("perf")
        if perf is None:
            return None
        fd, name = tempfile.mkstemp(prefix="perf-stat-", suffix=".csv")
        os.close(fd)
        output = Path(name)
        argv = [perf, "stat", "-x", ",", "-e", "instructions:u,instructions:k"]
        argv += ["-p", str(pid), "-o", str(output)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.1)  # attached before the run starts
        if process.poll() is not None:
            output.unlink(missing_ok=True)
            return None
        return cls(process, output)

    def stop(self) -> float | None:
        """Instructions counted (user + kernel), or None if perf could not count them."""
        self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(timeout=10)
            text = self._output.read_text()
        except (subprocess.TimeoutExpired, OSError):
            self._process.kill()
            return None
        finally:
            self._output.unlink(missing_ok=True)
        counts = []
        for line in text.splitlines():
            fields = line.split(",")  # value,unit,event,... (perf stat -x ,)
            if len(fields) > 2 and fields[2].startswith("instructions"):
                if not fields[0].isdigit():
                    return None  # "<not supported>" or "<not counted>": no PMU here
                counts.append(int(fields[0]))
        return float(sum(counts)) if len(counts) == 2 else None


def run_rounds(
    targets: Sequence[Target], load: WrkLoad, *, runs: int, warmup_s: int, log: Any = print
) -> None:
    """Warm every target up, then run the targets in turn, `runs` rounds, interleaved.

    Interleaving spreads slow drifts (thermal, page cache, noisy neighbours) evenly over
    the targets instead of penalising whichever happens to run last.
    """
    for target in targets:
        if warmup_s > 0:
            log(f"  warm-up {target.name} ({warmup_s}s)")
            run_wrk(load, target.url, warmup_s)
    for round_no in range(1, runs + 1):
        for target in targets:
            result = target.measure(partial(run_wrk, load, target.url))
            target.runs.append(result)
            flag = "" if result.valid else "  << errors!"
            log(
                f"  round {round_no}/{runs} {target.name:<12} {result.requests_per_s:>10,.0f} req/s"
                f"  p50 {fmt_ms(result.p50_ms)}  p99 {fmt_ms(result.p99_ms)}{flag}"
            )
    for target in targets:
        target.sample_rss()


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:7.0f}µs" if ms < 1.0 else f"{ms:7.2f}ms"


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def per_round_ratios(top: Target, bottom: Target, metric: str) -> list[float]:
    """The ratio within each round, to show how stable the median ratio is."""
    return [
        ratio(getattr(a, metric), getattr(b, metric))
        for a, b in zip(top.runs, bottom.runs, strict=True)
    ]


def print_table(targets: Sequence[Target], out: Any = sys.stdout) -> None:
    header = f"{'target':<14}{'req/s':>12}{'p50':>11}{'p99':>11}{'errors':>8}{'non-2xx':>9}"
    header += f"{'RSS':>10}{'CPU/req':>10}{'instr/req':>11}"
    print(header, file=out)
    print("-" * len(header), file=out)
    for target in targets:
        m = target.median()
        rss = f"{target.rss_kib / 1024:.1f}MiB" if target.rss_kib is not None else "-"
        cpu = f"{m.cpu_us_per_request:.1f}µs" if m.cpu_us_per_request is not None else "-"
        counted = m.instructions_per_request
        instructions = f"{counted / 1000:,.1f}k" if counted is not None else "-"
        print(
            f"{target.name:<14}{m.requests_per_s:>12,.0f}{fmt_ms(m.p50_ms):>11}"
            f"{fmt_ms(m.p99_ms):>11}{m.errors:>8}{m.non_2xx:>9}{rss:>10}{cpu:>10}"
            f"{instructions:>11}",
            file=out,
        )


def finish_run(
    args: Any,
    *,
    benchmark: str,
    pinning: dict[str, Any],
    targets: list[dict[str, Any]],
    summary: Any,
    busy: float,
    invalid: list[str],
    problems: list[str],
    what: str,
) -> int:
    """Print logged problems, write the --json report, and give the exit code (2 = invalid)."""
    for line in problems[:20]:
        print(f"logged: {line}")
    if args.json:
        payload = {
            "benchmark": benchmark,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "pinning": pinning,
            "targets": targets,
            "summary": summary,
            "background_cpu_percent": busy,
            "valid": not invalid and not problems,
            "logged_problems": problems,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if invalid or problems:
        print(
            f"INVALID RUN: {what} from {', '.join(invalid) or 'none'}; "
            f"{len(problems)} error lines logged by the services"
        )
        return 2
    return 0
