"""Refresh throughput: N due connections refreshed by one tick, against a bare-client floor.

What it does, in order (only steps 4 and 5 are timed):

1. starts ``bench/token_endpoint_server.py`` as its own process (so the provider does not share
   this process's event loop or GIL): a strict refresh_token endpoint that rotates the refresh
   token on every use, answers after ``--latency-ms`` (default 50 ms) and counts refreshes and
   ``invalid_grant`` answers per key namespace;
2. builds the runtime the way an entry point does (``build_runtime`` with the embedded
   backend: SQLite in WAL mode with ``synchronous=FULL``, AES-GCM sealed credentials) in a
   temporary state directory on disk;
3. registers N connections through ``ConnectionRegistry.register`` (the operator path; one
   transaction each), all due at once;
4. **floor**: the same token-endpoint calls (same form, same Basic client authentication,
   same headers, response read and JSON-parsed) made by a bare aiohttp ``ClientSession`` at
   ``--concurrency`` requests in flight, for N keys of their own, nothing stored. It runs
   before the tick and again after it (``--floor-runs 2``); the *faster* run is the floor, so
   drift on the machine can only lower the ratio, never flatter it;
5. **tick**: ``asyncio.run(runtime.tick())`` refreshes all N through the library: claim,
   read and decrypt, refresh, seal, commit (secret version, then state with fencing token,
   then outbox events), in batches as results arrive. A refresh counts as done only once
   committed; the timer stops when the tick returns, i.e. after the last commit;
6. checks, untimed: the summary says N refreshed and nothing failed; the provider saw exactly
   N refreshes and no ``invalid_grant`` from the library; every connection reads back through
   the store at version 2 holding the provider's rotated refresh token, with state version 2
   and a future ``next_refresh_at``; the outbox holds N ``credential.rotated`` events; and the
   database really ran with ``synchronous=FULL`` in WAL mode. Exits 1 if any check fails.

The last line on stdout is one JSON object with ``n``, ``seconds``, ``per_second``,
``floor_per_second`` and ``ratio`` (library rate / floor rate) plus details. Library logging
is set to ``warning`` for the run (``log_level`` in the JSON says so).

The provider process is CPU-bound too at these rates: its own CPU use during each phase is
reported (``server_cpu_*``) and the JSON warns when it was near one full core, because then
the provider, not the client, set the pace.

Usage: ``.venv/bin/python bench/refresh_throughput.py [--n 10000] [--latency-ms 50]
[--concurrency 256] [--json-only]``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tokenbroker.connections import ConnectionRegistry
from tokenbroker.log import configure_logging
from tokenbroker.model import Connection, ConnectionStatus, Credential, EventType, GrantType
from tokenbroker.refresher import TickSummary
from tokenbroker.runtime import Runtime, build_runtime
from tokenbroker.secret import Secret
from tokenbroker.settings import Settings

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "token_endpoint_server.py"
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"  # noqa: S105 - a benchmark fixture, not a credential
LOG_LEVEL = "warning"
# The acceptance figures from the issue, for 10,000 connections on this kind of machine.
TARGET_SECONDS_AT_10K = 15.0
TARGET_RATIO = 0.33
# Above this share of one core, the provider process is likely what limits the rate.
SERVER_SATURATED = 0.85


def log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


# -- the provider process ---------------------------------------------------------------------


@dataclass
class ProviderProcess:
    process: subprocess.Popen[str]
    port: int

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


@contextlib.contextmanager
def provider_process(latency_ms: float) -> Iterator[ProviderProcess]:
    process = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE,
        stderr=None,  # its errors, if any, show up on ours
        text=True,
    )
    provider: ProviderProcess | None = None
    try:
        assert process.stdout is not None  # noqa: S101
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=20):
                raise RuntimeError("token endpoint did not report READY within 20 s")
        line = process.stdout.readline().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"token endpoint failed to start: {line!r}")
        provider = ProviderProcess(process, int(line.split()[1]))
        yield provider
    finally:
        if provider is not None:
            provider.stop()
        elif process.poll() is None:
            process.kill()
            process.wait(timeout=5)


# -- what both clients send -------------------------------------------------------------------


def refresh_token_for(namespace: str, index: int, generation: int) -> str:
    return f"rt-{namespace}_{index:06d}-{generation}"


def basic_auth() -> str:
    return "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()


# -- the floor: a bare aiohttp client, nothing stored -----------------------------------------


async def bare_client_run(url: str, namespace: str, n: int, concurrency: int) -> int:
    """N refresh calls at ``concurrency`` in flight; returns how many were not 200."""
    headers = {
        "Authorization": basic_auth(),
        "Accept": "application/json",
        "User-Agent": "tokenbroker-bench-floor",
    }
    failures = 0
    indices = iter(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal failures
            for index in indices:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": refresh_token_for(namespace, index, 0),
                }
                async with session.post(url, data=form, headers=headers) as response:
                    body = await response.read()
                    if response.status != 200 or "access_token" not in json.loads(body):
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return failures


async def replay_is_refused(url: str, namespace: str) -> bool:
    """Present an already-consumed refresh token once: a strict provider must refuse it, or
    "no invalid_grant" would prove nothing."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token_for(namespace, 0, 0)}
    headers = {"Authorization": basic_auth(), "Accept": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=form, headers=headers) as response,
    ):
        body = json.loads(await response.read())
    return response.status == 400 and body.get("error") == "invalid_grant"


# -- the library side --------------------------------------------------------------------------


@dataclass
class PhaseTimer:
    """Wall and thread-CPU time spent in store calls during the tick (they run in threads)."""

    calls: dict[str, list[float]] = field(default_factory=dict)

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                entry = self.calls.setdefault(name, [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - wall
                entry[2] += time.thread_time() - cpu

        return timed

    def report(self) -> dict[str, Any]:
        return {
            name: {"calls": int(c), "wall_s": round(w, 3), "cpu_s": round(u, 3)}
            for name, (c, w, u) in self.calls.items()
        }


def instrument(runtime: Runtime, timer: PhaseTimer) -> None:
    """Time the store calls the tick makes by wrapping them on these instances (not the class)."""
    for store, names in (
        (runtime.state, ("claim_due", "complete", "release")),
        (runtime.secrets, ("get_many", "put_many")),
        (runtime.events, ("publish",)),
    ):
        for name in names:
            setattr(store, name, timer.wrap(f"{type(store).__name__}.{name}", getattr(store, name)))


class Profiler:
    """cProfile sees only the thread that enabled it (the event loop); the commits run in
    worker threads, which yappi (``pip install --target DIR yappi``, then ``PYTHONPATH=DIR``)
    also sees. Both write a file ``pstats`` reads."""

    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path = kind, path
        self._profile: Any = None

    def start(self) -> None:
        if self.kind == "yappi":
            import yappi  # type: ignore[import-not-found]  # not a dependency: profiling only

            yappi.set_clock_type("cpu")
            yappi.start(builtins=True, profile_threads=True)
        else:
            import cProfile

            self._profile = cProfile.Profile()
            self._profile.enable()

    def stop(self) -> None:
        if self.kind == "yappi":
            import yappi

            yappi.stop()
            yappi.get_func_stats().save(str(self.path), type="pstat")
            with self.path.with_suffix(".threads.txt").open("w") as out:
                yappi.get_thread_stats().print_all(out=out)
        else:
            self._profile.disable()
            self._profile.dump_stats(self.path)


def connection_id(index: int) -> str:
    return f"c{index:06d}"


def register_all(runtime: Runtime, token_url: str, n: int) -> None:
    registry = ConnectionRegistry(
        secrets=runtime.secrets, state=runtime.state, profiles=runtime.profiles, clock=runtime.clock
    )
    for index in range(n):
        registry.register(
            Connection(
                id=connection_id(index),
                profile="generic",  # client_secret_basic, like the floor
                grant=GrantType.REFRESH_TOKEN,
                client_id=CLIENT_ID,
                token_url=token_url,
            ),
            Credential(
                refresh_token=Secret(refresh_token_for("lib", index, 0)),
                client_secret=Secret(CLIENT_SECRET),
            ),
        )


def verify(
    runtime: Runtime, summary: TickSummary, n: int, server: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """Everything that must hold after the tick; returns (problems, facts)."""
    problems: list[str] = []
    counters = server["counters"]
    if summary.refreshed != n or not summary.ok:
        problems.append(f"tick summary: {json.dumps(summary.to_json())}")
    if counters.get("refreshed:lib", 0) != n:
        problems.append(f"provider refreshed {counters.get('refreshed:lib', 0)} of {n}")
    if counters.get("invalid_grant:lib", 0):
        problems.append(f"provider answered invalid_grant {counters['invalid_grant:lib']} times")
    if counters.get("invalid_client", 0):
        problems.append(f"provider answered invalid_client {counters['invalid_client']} times")

    ids = [connection_id(i) for i in range(n)]
    stored = runtime.secrets.get_many(ids)
    wrong_version = wrong_token = 0
    for index, cid in enumerate(ids):
        item = stored.get(cid)
        if item is None or item.version != 2:
            wrong_version += 1
            continue
        token = item.credential.refresh_token
        if token is None or token.reveal() != refresh_token_for("lib", index, 1):
            wrong_token += 1
    if wrong_version:
        problems.append(f"{wrong_version} connections are not at secret version 2")
    if wrong_token:
        problems.append(f"{wrong_token} connections do not hold the rotated refresh token")

    now = runtime.clock.now()
    records = runtime.state.list()
    bad_state = sum(
        1
        for r in records
        if r.state.current_version != 2
        or r.state.status is not ConnectionStatus.ACTIVE
        or r.state.next_refresh_at is None
        or r.state.next_refresh_at <= now
        or r.state.consecutive_failures
    )
    if len(records) != n or bad_state:
        problems.append(f"{bad_state} of {len(records)} states are not active at version 2")

    events = runtime.events.read(limit=n + 1)  # type: ignore[attr-defined]
    rotated = {e.connection_id for _, e in events if e.type is EventType.ROTATED}
    if len(events) != n or len(rotated) != n:
        problems.append(f"outbox holds {len(events)} events for {len(rotated)} rotations")

    db = runtime.resources[0]
    synchronous = db.read("PRAGMA synchronous")[0][0]
    journal = db.read("PRAGMA journal_mode")[0][0]
    if synchronous != 2 or journal != "wal":  # 2 = FULL
        problems.append(f"database ran with synchronous={synchronous}, journal_mode={journal}")
    facts = {"sqlite_synchronous": "FULL" if synchronous == 2 else synchronous, "journal": journal}
    return problems, facts


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="N due connections refreshed by one tick vs a bare aiohttp floor."
    )
    parser.add_argument("--n", type=int, default=10_000, help="connections (default 10000)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="provider latency")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument(
        "--floor-runs", type=int, default=2, help="bare-client runs; 2 = before and after"
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep-state", action="store_true", help="do not delete the state dir")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a pstats profile of the tick to PATH"
    )
    parser.add_argument(
        "--profiler",
        choices=("cprofile", "yappi"),
        default="cprofile",
        help="cprofile: event-loop thread only; yappi (if importable): every thread, CPU time",
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.floor_runs < 1:
        parser.error("--n, --concurrency and --floor-runs must be at least 1")
    return args


@dataclass
class Phase:
    """One timed phase: wall seconds and CPU use (in cores) of this process and the provider."""

    seconds: float
    client_cpu: float
    server_cpu: float

    def rate(self, n: int) -> float:
        return n / self.seconds


def timed(provider: ProviderProcess, action: Callable[[], Any]) -> tuple[Any, Phase]:
    before, cpu = provider.stats()["cpu_seconds"], cpu_seconds()
    started = time.perf_counter()
    value = action()
    seconds = time.perf_counter() - started
    client_cpu = (cpu_seconds() - cpu) / seconds
    server_cpu = (provider.stats()["cpu_seconds"] - before) / seconds
    return value, Phase(seconds, client_cpu, server_cpu)


def floor_run(provider: ProviderProcess, run_no: int, args: argparse.Namespace) -> Phase:
    failures, phase = timed(
        provider,
        lambda: asyncio.run(
            bare_client_run(provider.token_url, f"floor{run_no}", args.n, args.concurrency)
        ),
    )
    if failures:
        raise RuntimeError(f"floor run {run_no}: {failures} calls failed")
    log(f"floor run {run_no}: {phase.rate(args.n):,.0f}/s ({phase.seconds:.2f} s)", args.json_only)
    return phase


@dataclass
class TickRun:
    summary: TickSummary
    phase: Phase
    store_calls: dict[str, Any]
    commits: list[tuple[float, int]]


def tick_run(runtime: Runtime, provider: ProviderProcess, args: argparse.Namespace) -> TickRun:
    """The measured tick: ``asyncio.run(runtime.tick())`` with every connection due."""
    timer = PhaseTimer()
    instrument(runtime, timer)
    profiler = Profiler(args.profiler, args.profile) if args.profile else None
    commits: list[tuple[float, int]] = []
    started = 0.0

    def progress(committed: int, _total: int) -> None:
        commits.append((time.perf_counter() - started, committed))

    def tick() -> TickSummary:
        nonlocal started
        if profiler is not None:
            profiler.start()
        started = time.perf_counter()
        try:
            return asyncio.run(runtime.tick(progress=progress))
        finally:
            if profiler is not None:
                profiler.stop()

    summary, phase = timed(provider, tick)
    store_calls = timer.report()  # before the checks add reads of their own
    log(f"tick: {phase.rate(args.n):,.0f}/s ({phase.seconds:.2f} s)", args.json_only)
    return TickRun(summary, phase, store_calls, commits)


def report(
    args: argparse.Namespace,
    *,
    setup_seconds: float,
    floors: list[Phase],
    tick: TickRun,
    server: dict[str, Any],
    facts: dict[str, Any],
    problems: list[str],
) -> dict[str, Any]:
    n = args.n
    best = min(floors, key=lambda p: p.seconds)
    per_second = tick.phase.rate(n)
    counters = server["counters"]
    result: dict[str, Any] = {
        "n": n,
        "seconds": round(tick.phase.seconds, 3),
        "per_second": round(per_second, 1),
        "floor_per_second": round(best.rate(n), 1),
        "ratio": round(per_second / best.rate(n), 3),
        "floor_seconds": round(best.seconds, 3),
        "floor_runs_per_second": [round(p.rate(n), 1) for p in floors],
        "setup_seconds": round(setup_seconds, 2),
        "tick_summary_seconds": round(tick.summary.seconds, 3),
        "refreshed": tick.summary.refreshed,
        "server_refreshed": counters.get("refreshed:lib", 0),
        "server_invalid_grants": counters.get("invalid_grant:lib", 0),
        "server_max_in_flight": server["max_in_flight"],
        "tick_client_cpu": round(tick.phase.client_cpu, 2),
        "tick_server_cpu": round(tick.phase.server_cpu, 2),
        "floor_client_cpu": round(best.client_cpu, 2),
        "floor_server_cpu": round(best.server_cpu, 2),
        # This process's CPU per call (all threads): on 2 cores the tick is bound by it.
        "tick_cpu_us_per_refresh": round(tick.phase.client_cpu * tick.phase.seconds / n * 1e6),
        "floor_cpu_us_per_call": round(best.client_cpu * best.seconds / n * 1e6),
        "store_calls": tick.store_calls,
        "commit_batches": len(tick.commits),
        "first_commit_at_s": round(tick.commits[0][0], 3) if tick.commits else None,
        "last_commit_at_s": round(tick.commits[-1][0], 3) if tick.commits else None,
        "latency_ms": args.latency_ms,
        "concurrency": args.concurrency,
        # The best any client can do with this many requests in flight at this latency.
        "ceiling_per_second": (
            round(args.concurrency / (args.latency_ms / 1000), 1) if args.latency_ms else None
        ),
        "backend": "embedded",
        **facts,
        "log_level": LOG_LEVEL,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "event_loop": "asyncio (default)",
        "ok": not problems,
    }
    notes = []
    if max(best.server_cpu, tick.phase.server_cpu) >= SERVER_SATURATED:
        notes.append("the provider process used most of a core: it may be what limits the rate")
    if n == 10_000 and (
        tick.phase.seconds > TARGET_SECONDS_AT_10K or result["ratio"] < TARGET_RATIO
    ):
        notes.append(f"below target: at most {TARGET_SECONDS_AT_10K:.0f} s, ratio {TARGET_RATIO}")
    if notes:
        result["notes"] = notes
    if problems:
        result["problems"] = problems
    return result


def run(args: argparse.Namespace) -> int:
    configure_logging(LOG_LEVEL)
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="tokenbroker-bench-"))
    try:
        with provider_process(args.latency_ms) as provider:
            settings = Settings(
                backend="embedded",
                state_dir=state_dir,
                tick_limit=args.n,
                concurrency=args.concurrency,
            )
            runtime = build_runtime(settings)
            try:
                started = time.perf_counter()
                register_all(runtime, provider.token_url, args.n)
                setup_seconds = time.perf_counter() - started
                log(f"setup: {args.n} connections in {setup_seconds:.2f} s", args.json_only)

                # Warm-up, untimed: imports, first connections, the provider's code paths.
                url = provider.token_url
                asyncio.run(bare_client_run(url, "warm", min(args.n, 512), args.concurrency))
                if not asyncio.run(replay_is_refused(url, "warm")):
                    raise RuntimeError("the token endpoint accepted a consumed refresh token")

                floors = [floor_run(provider, 1, args)]
                tick = tick_run(runtime, provider, args)
                floors += [floor_run(provider, i, args) for i in range(2, args.floor_runs + 1)]

                server = provider.stats()
                problems, facts = verify(runtime, tick.summary, args.n, server)
            finally:
                runtime.close()
    finally:
        if args.state_dir is None and not args.keep_state:
            shutil.rmtree(state_dir, ignore_errors=True)
        else:
            log(f"state kept in {state_dir}", args.json_only)
    result = report(
        args,
        setup_seconds=setup_seconds,
        floors=floors,
        tick=tick,
        server=server,
        facts=facts,
        problems=problems,
    )
    for problem in problems:
        log(f"CHECK FAILED: {problem}", quiet=False)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
