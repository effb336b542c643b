"""Process lifecycle: uvloop, the proxy and admin listeners, workers, signals, drain, reload."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from shieldproxy.admin.app import build_admin_app
from shieldproxy.admin.audit import AuditLog
from shieldproxy.admin.auth import load_or_create_secret, resolve_admin_token
from shieldproxy.config import Config, ConfigError, load_config, split_host_port
from shieldproxy.handler import ProxyHandler
from shieldproxy.http_server import ProxyServer, server_kwargs
from shieldproxy.keys.registry import KeyRegistry
from shieldproxy.keys.secret import KeyHasher
from shieldproxy.limits.engine import LimiterSettings, RateLimiter
from shieldproxy.metrics import ProxyMetrics, SnapshotFiles
from shieldproxy.state import ProxyState, Runtime
from shieldproxy.store import open_store, refusal_at_start
from shieldproxy.store.urls import redact

log = logging.getLogger("shieldproxy")

EXIT_FATAL = 3  # a worker that cannot start (port taken): restarting would not help
_RESTART_NEEDED = (
    "server.listen",
    "server.admin_listen",
    "server.workers",
    "server.data_dir",
    # The listener's protocol settings are fixed when it starts.
    "server.max_request_line_bytes",
    "server.max_header_bytes",
    "server.max_header_count",
    "server.header_timeout_seconds",
    "server.keepalive_timeout_seconds",
    "server.send_timeout_seconds",
    "store.url",
    "store.prefix",
)


@dataclass(frozen=True)
class ConfigSource:
    """Where the config comes from, so a reload (or a new worker) reads the same sources."""

    path: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Config:
        return load_config(self.path, overrides=self.overrides)


def configure_logging(level: str, worker: int | None = None) -> None:
    tag = "" if worker is None else f"[worker {worker}]"
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        force=True,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def serve(source: ConfigSource) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the process exit code."""
    config = source.load()
    configure_logging(config.server.log_level)
    if config.server.workers == 1:
        return run_worker(source, 0, 1)
    return Supervisor(source, config).run()


def run_worker(source: ConfigSource, index: int, workers: int, *, restarted: bool = False) -> int:
    # Until the event loop takes SIGHUP over, a reload request must not kill us; the config
    # is read below, so nothing is missed.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = source.load()
    configure_logging(config.server.log_level, index if workers > 1 else None)
    return uvloop.run(_worker_main(source, config, index, workers, restarted=restarted))


def _worker_entry(source: ConfigSource, index: int, workers: int, restarted: bool) -> None:
    """Target of each spawned worker process."""
    try:
        code = run_worker(source, index, workers, restarted=restarted)
    except ConfigError as exc:
        log.error("config error: %s", "; ".join(exc.problems))
        code = EXIT_FATAL
    sys.exit(code)


async def _worker_main(
    source: ConfigSource, config: Config, index: int, workers: int, *, restarted: bool = False
) -> int:
    loop = asyncio.get_running_loop()
    server = config.server
    data_dir = Path(server.data_dir)
    try:
        token = resolve_admin_token(config.admin.token.get_secret_value(), data_dir)
        key_secret = _key_secret(config, data_dir)
    except (OSError, ValueError) as exc:
        log.error("data dir: %s", exc)
        return EXIT_FATAL
    metrics = ProxyMetrics()
    files = SnapshotFiles(data_dir / "run", index) if workers > 1 else None
    if files is not None and (previous := files.read_own()) is not None:
        metrics.absorb(previous, gauges=False)  # counters continue across a worker restart
    try:
        store = open_store(
            config.store.url,
            data_dir=data_dir,
            prefix=config.store.prefix,
            timeout_seconds=config.store.timeout_seconds,
            workers=workers,
            breaker_failures=config.store.breaker_failures,
            breaker_cooldown_seconds=config.store.breaker_cooldown_seconds,
        )
    except ValueError as exc:
        log.error("store: %s", exc)
        return EXIT_FATAL
    if (refused := await refusal_at_start(store)) is not None:
        if not restarted:
            log.error("store: %s (check the password and TLS options in store.url)", refused)
            await store.close()
            return EXIT_FATAL
        # Its siblings run on: a restarted worker joins them rather than stopping them all.
        log.error("store: %s; answering by on_store_error until it accepts us", refused)
    settings = LimiterSettings(
        prefix=config.store.prefix,
        reserve_seconds=config.rate_limits.reserve_seconds,
        reserve_min_limit=config.rate_limits.reserve_min_limit,
    )
    limiter = RateLimiter(store, settings=settings)
    await limiter.start()
    metrics.watch_limiter(limiter)
    registry = KeyRegistry(store, KeyHasher(key_secret.encode()), config)
    await registry.start()
    runtime = Runtime(config, loop, limiter, registry)
    state = ProxyState(
        runtime, metrics, store, limiter, registry, AuditLog(store), data_dir, index, workers
    )
    handler = ProxyHandler(state, loop.time)
    proxy = ProxyServer(
        handler,
        answer_early=handler.answer_early,
        **server_kwargs(
            max_line=server.max_request_line_bytes,
            max_field=server.max_header_bytes,
            header_timeout=server.header_timeout_seconds,
            send_timeout=server.send_timeout_seconds,
            idle_timeout=server.keepalive_timeout_seconds,
            max_headers=server.max_header_count + 1,
        ),
        on_client_timeout=metrics.client_timeout,
    )
    proxy_runner = web.ServerRunner(proxy, shutdown_timeout=server.shutdown_timeout_seconds)
    admin_runner = web.AppRunner(
        build_admin_app(state, token), access_log=None, shutdown_timeout=2.0
    )
    # Handlers before the listeners open: anyone who can reach the port may assume the
    # process handles SIGHUP (whose default action would kill it) and SIGTERM.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(source, state, loop))
    await proxy_runner.setup()
    await admin_runner.setup()
    try:
        for runner, address in ((proxy_runner, server.listen), (admin_runner, server.admin_listen)):
            host, port = split_host_port(address)
            site = web.TCPSite(runner, host, port, reuse_port=workers > 1, backlog=4096)
            await site.start()
    except OSError as exc:
        log.error("cannot listen: %s", exc.strerror or exc)
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
        await _close_all(state)
        return EXIT_FATAL
    _tune_gc()
    log.info(
        "proxying %s → %s; admin API on %s", server.listen, config.upstream.url, server.admin_listen
    )
    housekeeping = asyncio.ensure_future(_housekeeping(state, files, stop, os.getppid(), workers))
    await stop.wait()
    state.draining = True
    if server.drain_delay_seconds:
        log.info(
            "draining: /readyz fails for %ss before the listener closes", server.drain_delay_seconds
        )
        await asyncio.sleep(server.drain_delay_seconds)
    log.info("draining: finishing in-flight requests (up to %ss)", server.shutdown_timeout_seconds)
    await proxy_runner.cleanup()
    housekeeping.cancel()
    await _close_all(state)
    if files is not None:
        files.write(metrics)
    await admin_runner.cleanup()
    log.info("stopped")
    return 0


def _tune_gc() -> None:
    """Everything built at startup lives as long as the process: move it out of the
    collector's sight (gc.freeze), and collect the young generation less often. A request
    allocates a few dozen short-lived objects that reference counting frees; the default
    threshold (700) ran a collection every few requests for nothing."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


async def _close_all(state: ProxyState) -> None:
    await state.runtime.close()
    await state.registry.close()
    await state.limiter.close()
    await state.store.close()


def _key_secret(config: Config, data_dir: Path) -> str:
    """The HMAC secret for key hashes: configured, or generated once into the data dir.

    Every instance that shares a store must hash with the same secret; a generated one is
    shared by the workers of one machine only, so several machines must configure it.
    """
    configured = config.auth.key_secret.get_secret_value()
    if configured:
        return configured
    if config.store.url != "local":
        log.warning(
            "auth.key_secret is not set: using %s; every instance sharing %s must use the "
            "same secret",
            data_dir / "key-secret",
            config.store.url.split("://")[0],
        )
    return load_or_create_secret(data_dir / "key-secret", "spkey_", "a key hashing secret")


async def _housekeeping(
    state: ProxyState,
    files: SnapshotFiles | None,
    stop: asyncio.Event,
    parent: int,
    workers: int,
) -> None:
    """Once a second: publish this worker's metrics; stop if the supervisor died."""
    while True:
        await asyncio.sleep(1.0)
        if files is not None:
            with contextlib.suppress(OSError):
                files.write(state.metrics)
        if workers > 1 and os.getppid() != parent:
            log.error("the supervisor is gone; stopping")
            stop.set()


def _reload(source: ConfigSource, state: ProxyState, loop: asyncio.AbstractEventLoop) -> None:
    """SIGHUP: build a new Runtime from the same sources; keep the old one if invalid."""
    try:
        config = source.load()
    except ConfigError as exc:
        state.metrics.reload("rejected")
        log.error("reload rejected, keeping the running config: %s", "; ".join(exc.problems))
        return
    old = state.runtime
    for dotted in _RESTART_NEEDED:
        section, key = dotted.split(".")
        before = getattr(getattr(old.config, section), key)
        after = getattr(getattr(config, section), key)
        if before != after:
            if dotted == "store.url":
                before, after = redact(before), redact(after)
            log.warning("%s changed (%s → %s): takes effect after a restart", dotted, before, after)
    runtime = Runtime(config, loop, state.limiter, state.registry)
    state.registry.reconfigure(config)
    state.runtime = runtime
    state.metrics.reload("applied")
    log.info("config reloaded")
    # Requests already running keep the old runtime; its pool closes connections as they
    # come back, and whatever is still busy after the grace period.
    task = loop.create_task(old.close(config.server.reload_grace_seconds))
    task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)


class Supervisor:
    """Runs N workers sharing the listeners through SO_REUSEPORT; restarts the dead ones."""

    def __init__(self, source: ConfigSource, config: Config) -> None:
        self.source = source
        self.config = config
        self.count = config.server.workers
        self.processes: dict[int, BaseProcess] = {}
        self.started: dict[int, float] = {}
        self.stopping = False
        self.failures = 0
        self._context = multiprocessing.get_context("spawn")

    def run(self) -> int:
        server = self.config.server
        for address in (server.listen, server.admin_listen):
            problem = _probe_bind(address)
            if problem:
                log.error("cannot listen on %s: %s", address, problem)
                return 1
        run_dir = Path(server.data_dir) / "run" / "metrics"
        shutil.rmtree(run_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for index in range(self.count):
            self._start(index)
        log.info("supervising %d workers (pid %d)", self.count, os.getpid())
        code = 0
        while self.processes:
            sentinels = {p.sentinel: i for i, p in self.processes.items()}
            for sentinel in wait_for_sentinels(list(sentinels), timeout=0.5):
                index = sentinels[sentinel]  # type: ignore[index]
                process = self.processes.pop(index)
                process.join()
                if self.stopping:
                    continue
                if process.exitcode == EXIT_FATAL:
                    log.error("worker %d cannot start; stopping", index)
                    code = 1
                    self._on_stop(signal.SIGTERM, None)
                    continue
                log.warning("worker %d exited (code %s); restarting", index, process.exitcode)
                self._backoff(index)
                self._start(index, restarted=True)
        return code

    def _start(self, index: int, *, restarted: bool = False) -> None:
        process = self._context.Process(
            target=_worker_entry,
            args=(self.source, index, self.count, restarted),
            name=f"shieldproxy-worker-{index}",
            daemon=False,
        )
        process.start()
        self.processes[index] = process
        self.started[index] = time.monotonic()

    def _backoff(self, index: int) -> None:
        """A worker that dies right after starting is crash-looping: slow the restarts."""
        if time.monotonic() - self.started.get(index, 0.0) < 2.0:
            self.failures += 1
            time.sleep(min(0.2 * 2**self.failures, 5.0))
        else:
            self.failures = 0

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping %d workers", len(self.processes))
        for process in self.processes.values():
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = self.config.server.shutdown_timeout_seconds + 5.0
        signal.signal(signal.SIGALRM, self._kill_stragglers)
        signal.setitimer(signal.ITIMER_REAL, deadline)

    def _kill_stragglers(self, signum: int, frame: object) -> None:
        for process in self.processes.values():
            if process.pid is not None:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)

    def _on_hup(self, signum: int, frame: object) -> None:
        for process in self.processes.values():
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


def _probe_bind(address: str) -> str | None:
    """Fail fast (one clear line) if a listener address cannot be bound at all."""
    host, port = split_host_port(address)
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return str(exc.strerror)
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None
