"""The fault suite's harness: deployments, refresher processes, kills, verdicts and figures.

Everything the suite tries runs against real parts: oidc-provider rotating refresh tokens
and revoking the grant on reuse (``tests/oidc_server``), behind :class:`~.fault_proxy.FaultProxy`;
the embedded store on disk; the Firestore and Pub/Sub emulators and the Secret Manager test
server behind :class:`~.fault_proxy.TcpProxy`; refreshers as real processes (``tokenbroker
refresh``/``serve``, the refresher function under ``functions-framework``, and
:mod:`tests.support.chaos_refresher` where a setting the CLI lacks is needed).

How a lost connection is told: after a scenario, each connection's stored refresh token is
asked of the provider (``POST /test/refresh-tokens``, which consumes nothing). ``active``: the
connection works. ``stale``: the stored token was consumed -- a newer one was issued and never
stored, so the next refresh replays the old one and the provider revokes the grant.
``revoked``: the grant is gone (a replay happened). ``missing``: no credential is stored.

Where a kill landed, per lost connection, from the proxy's ledger and the store: the last
exchange of that connection that started before the kill either had not rotated anything
(``not_sent``), or rotated and its answer reached the refresher after the kill or never
(``on_the_wire``), or reached it before the kill but the store holds an older generation
(``answered_not_durable``), or was stored (``durable``: lost later for another reason).

The loss window is measured per stored rotation: from the moment the proxy delivered the
answer carrying the new refresh token to the moment the store first wrote a version holding
it (embedded: ``secret_versions.created_at``; gcp: the Secret Manager test server's
``AddSecretVersion``, seen by an observer). Wall-clock times of one machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from tests.support.fault_proxy import FaultProxy, Ledger, TcpProxy
from tests.support.oidc import RT_BASIC_ID, RT_BASIC_SECRET, OidcServer, free_port
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    GrantType,
    RefreshState,
    StoredCredential,
)
from tokenbroker.kernel.secret import Secret

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FUNCTION_SOURCE = REPO / "functions" / "refresher" / "main.py"
CAPTURE_ENV = "TOKENBROKER_TEST_CAPTURE_DIR"

#: The step boundaries of one refresh, in order, as ``kernel/failpoints`` names them.
KILL_POINTS = (
    "lease.claimed",
    "intent.durable",
    "request.sent",
    "answer.received",
    "secret.written",
    "state.committed",
    "events.published",
)

NOT_SENT = "not_sent"
ON_THE_WIRE = "on_the_wire"
ANSWERED = "answered_not_durable"
#: The kill points with a request or its answer on the wire: what they catch cannot be durable.
ANSWER_ON_THE_WIRE = ("request.sent", "answer.received")
DURABLE = "durable"
STAGES = (NOT_SENT, ON_THE_WIRE, ANSWERED, DURABLE)


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The provider
# ---------------------------------------------------------------------------------------------


class Provider:
    """oidc-provider (rotation, revocation on reuse) and the proxies in front of it."""

    def __init__(self, workdir: Path, *, access_token_ttl: int = 300) -> None:
        self.oidc = OidcServer().start(workdir / "oidc", access_token_ttl=access_token_ttl)
        self.proxies: list[FaultProxy] = []

    def proxy(self) -> FaultProxy:
        proxy = FaultProxy(self.oidc.token_url).start()
        self.proxies.append(proxy)
        return proxy

    def mint(self, count: int) -> list[str]:
        # No openid scope: no ID token to sign per refresh (the provider is the bottleneck).
        return self.oidc.mint_refresh_tokens(count, RT_BASIC_ID, scope="offline_access api:read")

    def status(self, tokens: Sequence[str]) -> list[dict[str, Any]]:
        return self.oidc.refresh_token_status(tokens)

    def issued(self) -> set[str]:
        return self.oidc.ledger_tokens()

    def close(self) -> None:
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        self.oidc.stop()


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


class Proc:
    """A refresher process in its own session; its exit time is recorded by a waiter thread
    (a kill's time is when the process was seen dead, to the millisecond)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], out: Path) -> None:
        self.argv = list(argv)
        self.stdout_path = out.with_suffix(".stdout")
        self.stderr_path = out.with_suffix(".stderr")
        self.started_at = time.time()
        with self.stdout_path.open("ab") as stdout, self.stderr_path.open("ab") as stderr:
            self.popen = subprocess.Popen(
                self.argv,
                env=dict(env),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
        self.exited_at: float | None = None
        self._done = threading.Event()
        threading.Thread(target=self._wait, daemon=True).start()

    def _wait(self) -> None:
        self.popen.wait()
        self.exited_at = time.time()
        self._done.set()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode if self._done.is_set() else None

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL

    def wait(self, timeout: float) -> int | None:
        self._done.wait(timeout)
        return self.returncode

    def signal(self, sig: int) -> float:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)
        return time.time()

    def stdout(self) -> str:
        with contextlib.suppress(OSError):
            return self.stdout_path.read_text(errors="replace")
        return ""

    def output(self) -> str:
        text = self.stdout()
        with contextlib.suppress(OSError):
            text += self.stderr_path.read_text(errors="replace")
        return text

    def last_json(self) -> dict[str, Any] | None:
        """The process's summary: its whole stdout as one JSON object (``--json``), or the last
        line that is one (the launcher prints one per tick)."""
        text = self.stdout().strip()
        candidates = [text, *reversed(text.splitlines())]
        for candidate in candidates:
            with contextlib.suppress(ValueError):
                parsed = json.loads(candidate)
                if isinstance(parsed, dict):
                    return parsed
        return None

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGTERM)
            if self.wait(10) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # leftovers of the session (gunicorn workers)


def children(pid: int) -> list[int]:
    try:
        raw = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in raw.split()]


@dataclass
class TickResult:
    """One tick run by a process: its summary, or how it died."""

    killed: bool
    at: float
    returncode: int | None
    summary: dict[str, Any] | None
    tail: str = ""
    #: Ended by a traceback (an unexpected exception) rather than an answer.
    crashed: bool = False


class Running:
    """A tick under way in a real process: ``pid`` is the process doing the refreshing (the
    CLI, or the function's gunicorn worker), ``finish`` waits for its result."""

    def __init__(self, pid: int | None, finish: Callable[[], TickResult]) -> None:
        self.pid = pid
        self._finish = finish
        self._result: TickResult | None = None

    def finish(self) -> TickResult:
        if self._result is None:
            self._result = self._finish()
        return self._result


TRACEBACK = "Traceback (most recent call last)"


def _proc_result(proc: Proc, timeout: float = 600) -> TickResult:
    proc.wait(timeout)
    output = proc.output()
    return TickResult(
        proc.killed, proc.exited_at or time.time(), proc.returncode, proc.last_json(),
        output[-4000:], TRACEBACK in output,
    )  # fmt: skip


class RefresherFunction:
    """The refresher function (``functions/refresher/main.py``, HTTP target) under a real
    ``functions-framework`` (gunicorn) process; ``tick`` POSTs one trigger."""

    def __init__(self, env: Mapping[str, str], out: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            [
                str(BIN / "functions-framework"),
                "--target=refresh_http",
                f"--source={FUNCTION_SOURCE}",
                "--host=127.0.0.1",
                f"--port={self.port}",
            ],
            env,
            out,
        )
        deadline = time.monotonic() + 90
        while True:
            if self.proc.returncode is not None:
                raise RuntimeError(f"functions-framework exited: {self.proc.output()[-3000:]}")
            try:
                # A GET is answered 405 by the function, after it built its runtime (cold
                # start), so the tick that follows is warm.
                httpx.get(self.url + "/", timeout=30)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.proc.stop()
                    raise RuntimeError("functions-framework did not start in 90 s") from None
                time.sleep(0.2)

    def worker(self) -> int | None:
        kids = children(self.proc.pid)
        return kids[0] if kids else None

    def wait_worker(self, timeout: float = 60) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker = self.worker()
            if worker is not None:
                return worker
            time.sleep(0.05)
        return None

    def tick(self, ids: Sequence[str] | None = None, timeout: float = 300) -> TickResult:
        payload = {"connections": list(ids)} if ids is not None else {}
        offset = len(self.proc.output())
        try:
            response = httpx.post(self.url + "/", json=payload, timeout=timeout)
        except httpx.TransportError as error:
            return TickResult(True, time.time(), None, None, str(error))
        at = time.time()
        summary = None
        with contextlib.suppress(ValueError):
            body = response.json()
            summary = body if isinstance(body, dict) and "refreshed" in body else None
        logged = self.proc.output()[offset:]
        tail = ("" if summary else response.text[-2000:]) + "\n" + logged[-3000:]
        return TickResult(False, at, response.status_code, summary, tail, TRACEBACK in logged)

    def start_tick(self, ids: Sequence[str] | None = None) -> Running:
        worker = self.wait_worker()
        box: list[TickResult] = []
        thread = threading.Thread(target=lambda: box.append(self.tick(ids)), daemon=True)
        thread.start()

        def finish() -> TickResult:
            thread.join(600)
            return box[0] if box else TickResult(False, time.time(), None, None, "no answer")

        return Running(worker, finish)

    def stop(self) -> None:
        self.proc.stop()


# ---------------------------------------------------------------------------------------------
# Verdicts and figures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """A kill: where (a failpoint name, "random", "sigstop"), when, and who was exposed."""

    point: str
    at: float
    ids: tuple[str, ...]
    landed: bool = True


@dataclass(frozen=True)
class Verdict:
    cid: str
    lost: bool
    #: "active", "stale", "revoked" or "missing".
    why: str
    status: str | None
    last_error: str | None
    #: For a lost connection exposed to a kill: the kill point and the stage it caught.
    point: str | None = None
    stage: str | None = None


#: A request the killed process wrote just before dying may be read by the proxy a little
#: later (it sat in the socket buffer); no other process presents these connections so soon.
KILL_GRACE = 0.5


def stage_at(ledger: Ledger, cid: str, at: float, stored_generation: int | None) -> str:
    """Where ``cid`` was when a kill landed at ``at`` (see the module docstring)."""
    before = [
        e
        for e in ledger.select([cid])
        if e.started_at <= at or (e.started_at <= at + KILL_GRACE and e.client_gone)
    ]
    rotated = [e for e in before if e.rotated]
    if not rotated:
        return NOT_SENT
    last = rotated[-1]
    issued = (last.generation or 0) + 1
    if stored_generation is not None and stored_generation >= issued:
        return DURABLE
    if last.delivered and last.answered_at is not None and last.answered_at <= at:
        return ANSWERED
    return ON_THE_WIRE


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[index], 1)


@dataclass
class ScenarioResult:
    """What one scenario did and found. ``checks`` are the properties the scenario measured
    (name -> held); tests assert on them, the bench reports them."""

    name: str
    backend: str
    connections: int = 0
    faults_injected: int = 0
    refreshes: int = 0
    invalid_grant: int = 0
    reuse: int = 0
    lost: list[Verdict] = field(default_factory=list)
    loss_window_ms: list[float] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def connections_lost(self) -> int:
        return len(self.lost)

    def lost_by_kill_point(self) -> Counter[str]:
        return Counter(v.point or "(no kill)" for v in self.lost)

    def lost_by_stage(self) -> Counter[str]:
        return Counter(v.stage or "(no kill)" for v in self.lost)

    def check(self, name: str, held: bool) -> None:
        self.checks[name] = bool(held) and self.checks.get(name, True)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend,
            "connections": self.connections,
            "faults_injected": self.faults_injected,
            "refreshes": self.refreshes,
            "invalid_grant": self.invalid_grant,
            "reuse": self.reuse,
            "connections_lost": self.connections_lost,
            "lost_by_kill_point": dict(self.lost_by_kill_point()),
            "lost_by_stage": dict(self.lost_by_stage()),
            "lost_why": dict(Counter(v.why for v in self.lost)),
            "loss_window_ms": {
                "p50": percentile(self.loss_window_ms, 50),
                "p99": percentile(self.loss_window_ms, 99),
                "samples": len(self.loss_window_ms),
            },
            "checks": self.checks,
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def summarize(results: Iterable[ScenarioResult]) -> dict[str, Any]:
    """The suite's figures: the final JSON line of ``bench/chaos.py``."""
    chosen = list(results)
    windows = [w for r in chosen for w in r.loss_window_ms]
    by_point: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    for result in chosen:
        by_point.update(result.lost_by_kill_point())
        by_stage.update(result.lost_by_stage())
    return {
        "scenarios": len(chosen),
        "faults_injected": sum(r.faults_injected for r in chosen),
        "refreshes": sum(r.refreshes for r in chosen),
        "invalid_grant": sum(r.invalid_grant for r in chosen),
        "connections_lost": sum(r.connections_lost for r in chosen),
        "lost_by_kill_point": dict(sorted(by_point.items())),
        "lost_by_stage": dict(sorted(by_stage.items())),
        "loss_window_ms": {
            "p50": percentile(windows, 50),
            "p99": percentile(windows, 99),
            "samples": len(windows),
        },
        "scenario_errors": {r.name: r.error for r in chosen if r.error},
        "checks_failed": sorted(
            f"{r.name}: {name}" for r in chosen for name, held in r.checks.items() if not held
        ),
    }


# ---------------------------------------------------------------------------------------------
# Deployments
# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    """The refresher settings a deployment's processes get (as environment variables)."""

    concurrency: int = 8
    #: Long, unless timeouts are what a scenario tries: on a loaded machine a short timeout
    #: turns a slow answer into an unknown outcome (the provider rotated, the answer is lost).
    http_timeout: float = 20.0
    retry_attempts: int = 3
    retry_base_delay: float = 0.05
    lease_ttl: float = 30.0
    min_lead: float = 0.0
    log_level: str = "warning"

    def env(self) -> dict[str, str]:
        return {
            "TOKENBROKER_CONCURRENCY": str(self.concurrency),
            "TOKENBROKER_HTTP_TIMEOUT_SECONDS": str(self.http_timeout),
            "TOKENBROKER_RETRY_ATTEMPTS": str(self.retry_attempts),
            "TOKENBROKER_RETRY_BASE_DELAY_SECONDS": str(self.retry_base_delay),
            "TOKENBROKER_LEASE_TTL_SECONDS": str(self.lease_ttl),
            "TOKENBROKER_MIN_LEAD_SECONDS": str(self.min_lead),
            "TOKENBROKER_LOG_LEVEL": self.log_level,
        }


def _base_env() -> dict[str, str]:
    """The parent's environment without anything that configures the broker or the stores."""
    dropped = ("TOKENBROKER_", "FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", CAPTURE_ENV)
    return {k: v for k, v in os.environ.items() if not k.startswith(dropped)}


class Deployment:
    """One isolated broker: its stores, its fault proxy (and so its ledger), its processes."""

    backend = "?"

    def __init__(self, name: str, workdir: Path, provider: Provider, options: Options) -> None:
        self.name = name
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.options = options
        self.proxy = provider.proxy()
        self.ids: list[str] = []
        self._procs: list[Proc] = []
        self._counter = 0
        self.runtime: Runtime = self._build_runtime()

    # -- to be provided by each backend ---------------------------------------------------------

    def _build_runtime(self) -> Runtime:
        raise NotImplementedError

    def backend_env(self) -> dict[str, str]:
        raise NotImplementedError

    def start_tick(
        self, ids: Sequence[str] | None = None, *, failpoints: str | None = None, **env: str
    ) -> Running:
        """Start one tick in a real process (``ids``: exactly those connections, due or not)."""
        raise NotImplementedError

    def tick(
        self, ids: Sequence[str] | None = None, *, failpoints: str | None = None, **env: str
    ) -> TickResult:
        """One tick in a real process, to its end."""
        return self.start_tick(ids, failpoints=failpoints, **env).finish()

    def write_time(self, cid: str, version: int, token: str) -> float | None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        env = _base_env()
        env.update(self.options.env())
        env.update(self.backend_env())
        env.update(extra)
        return env

    def out(self, what: str) -> Path:
        self._counter += 1
        return self.workdir / f"{self.name}-{self._counter:03d}-{what}.log"

    def process(self, argv: Sequence[str], what: str, **env: str) -> Proc:
        proc = Proc(argv, self.env(**env), self.out(what))
        self._procs.append(proc)
        return proc

    def cli(self, *args: str, what: str = "cli", **env: str) -> Proc:
        return self.process([str(BIN / "tokenbroker"), *args], what, **env)

    def launcher(self, *args: str, what: str = "launcher", **env: str) -> Proc:
        """:mod:`tests.support.chaos_refresher`: for settings the CLI does not have."""
        return self.process(
            [sys.executable, "-m", "tests.support.chaos_refresher", *args], what, **env
        )

    def seed(self, prefix: str, count: int) -> list[str]:
        """``count`` connections with fresh grants, due now, as an operator registers them."""
        tokens = self.provider.mint(count)
        ids = [f"{prefix}-{i:04d}" for i in range(count)]
        pairs = [
            (
                Connection(
                    id=cid,
                    profile="generic",
                    grant=GrantType.REFRESH_TOKEN,
                    client_id=RT_BASIC_ID,
                    token_url=self.proxy.token_url,
                    auth_method=ClientAuthMethod.BASIC,
                    created_at=datetime.now(UTC),
                ),
                Credential(refresh_token=Secret(token), client_secret=Secret(RT_BASIC_SECRET)),
            )
            for cid, token in zip(ids, tokens, strict=True)
        ]
        self._register(pairs)
        for cid, token in zip(ids, tokens, strict=True):
            self.proxy.ledger.track(cid, token)
        self.ids.extend(ids)
        return ids

    def _register(self, pairs: list[tuple[Connection, Credential]]) -> None:
        """``ConnectionRegistry.register``, one by one (what ``tokenbroker add`` does)."""
        registry = self.runtime.registry()
        for connection, credential in pairs:
            registry.register(connection, credential)

    def at_risk(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` whose last outcome is unknown (serving their access token)."""
        return {cid for cid in ids if self.runtime.state.get(cid).state.at_risk}

    def with_intent(self, ids: Sequence[str]) -> set[str]:
        """Those of ``ids`` with a presentation on record whose outcome is not committed."""
        return {cid for cid in ids if self.runtime.state.get(cid).state.intent is not None}

    def force_due(self, ids: Sequence[str]) -> None:
        """Make ``ids`` due now (between rounds; nothing else is writing then)."""
        now = datetime.now(UTC) - timedelta(seconds=1)
        for cid in ids:
            record = self.runtime.state.get(cid)
            self.runtime.state.put_state(cid, replace(record.state, next_refresh_at=now))

    def stored(self, ids: Sequence[str]) -> dict[str, StoredCredential]:
        found: dict[str, StoredCredential] = {}
        for start in range(0, len(ids), 200):
            chunk = list(ids[start : start + 200])
            try:
                found.update(self.runtime.secrets.get_many(chunk))
            except TokenBrokerError:
                for cid in chunk:  # one bad record must not hide the others
                    with contextlib.suppress(TokenBrokerError):
                        found[cid] = self.runtime.secrets.get(cid)
        return found

    def records(self, ids: Sequence[str]) -> dict[str, ConnectionRecord]:
        wanted = set(ids)
        return {r.connection.id: r for r in self.runtime.state.list() if r.connection.id in wanted}

    def verify(self, ids: Sequence[str], kills: Sequence[Kill] = ()) -> list[Verdict]:
        """One verdict per connection; lost ones exposed to a kill say where it landed."""
        stored = self.stored(ids)
        records = self.records(ids)
        tokens = {
            cid: s.credential.refresh_token.reveal()
            for cid, s in stored.items()
            if s.credential.refresh_token is not None
        }
        present = [cid for cid in ids if cid in tokens]
        statuses = dict(
            zip(present, self.provider.status([tokens[c] for c in present]), strict=True)
        )
        verdicts = []
        for cid in ids:
            record = records.get(cid)
            state = record.state if record else None
            status = state.status.value if state else None
            error = state.last_error if state else None
            token = tokens.get(cid)
            if token is None:
                why = "missing"
            else:
                answer = statuses[cid]
                why = (
                    "active"
                    if answer["active"]
                    else "stale"
                    if answer["consumed"] and answer["grant"]
                    else "revoked"
                )
            verdict = Verdict(cid, why != "active", why, status, error)
            if verdict.lost:
                exposed = [k for k in kills if cid in k.ids and k.landed]
                if exposed:
                    kill = exposed[0]
                    lineage = self.proxy.ledger.lineage_of(token)
                    generation = lineage[1] if lineage else None
                    verdict = replace(
                        verdict,
                        point=kill.point,
                        stage=stage_at(self.proxy.ledger, cid, kill.at, generation),
                    )
            verdicts.append(verdict)
        return verdicts

    def loss_windows(self, ids: Sequence[str]) -> list[float]:
        """Answer delivered -> first stored, in ms, for each connection's current version."""
        samples = []
        for cid, stored in self.stored(ids).items():
            token = stored.credential.refresh_token
            if token is None:
                continue
            delivered = self.proxy.ledger.delivered_at(token.reveal())
            written = self.write_time(cid, stored.version, token.reveal())
            if delivered is not None and written is not None:
                samples.append(max(0.0, (written - delivered) * 1000))
        return samples

    def figures(
        self,
        result: ScenarioResult,
        ids: Sequence[str],
        kills: Sequence[Kill] = (),
        since: float | None = None,
    ) -> list[Verdict]:
        """Fill ``result`` with the ledger's counts and the verdicts for ``ids``."""
        summary = self.proxy.ledger.summary(ids, since)
        result.connections += len(ids)
        result.faults_injected += summary["faults"] + sum(1 for k in kills if k.landed)
        result.refreshes += summary["accepted"]
        result.invalid_grant += summary["invalid_grant"]
        result.reuse += summary["reuse"]
        verdicts = self.verify(ids, kills)
        result.lost.extend(v for v in verdicts if v.lost)
        result.loss_window_ms.extend(self.loss_windows(ids))
        return verdicts

    def close(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(Exception):
                proc.stop()
        with contextlib.suppress(Exception):
            self.runtime.close()


class EmbeddedDeployment(Deployment):
    """SQLite + AES-GCM in a state directory; refreshers are ``tokenbroker`` processes."""

    backend = "embedded"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def _build_runtime(self) -> Runtime:
        return build_runtime(Settings(backend="embedded", state_dir=self.state_dir))

    def backend_env(self) -> dict[str, str]:
        return {"TOKENBROKER_BACKEND": "embedded", "TOKENBROKER_STATE_DIR": str(self.state_dir)}

    def start_tick(
        self, ids: Sequence[str] | None = None, *, failpoints: str | None = None, **env: str
    ) -> Running:
        if failpoints:
            env["TOKENBROKER_FAILPOINTS"] = failpoints
        proc = self.cli("--json", "refresh", *(ids or ()), what="refresh", **env)
        return Running(proc.pid, lambda: _proc_result(proc))

    def write_time(self, cid: str, version: int, token: str) -> float | None:  # noqa: ARG002
        database = self.state_dir / "tokenbroker.db"
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
            ) as db:
                row = db.execute(
                    "SELECT created_at FROM secret_versions"
                    " WHERE connection_id = ? AND version = ?",
                    (cid, version),
                ).fetchone()
        except sqlite3.Error:
            return None
        return float(row[0]) if row else None


class GcpDeployment(Deployment):
    """Secret Manager test server, Firestore and Pub/Sub emulators, each behind a TCP proxy
    the refreshers go through; refreshers are the refresher function under
    functions-framework. The harness reads the stores directly, not through the proxies."""

    backend = "gcp"

    def __init__(self, name: str, workdir: Path, provider: Provider, options: Options) -> None:
        from tests.support.emulators import emulator
        from tests.support.secretmanager_server import SecretManagerTestServer

        self.project = f"tb-chaos-{uuid.uuid4().hex[:10]}"
        firestore = emulator("firestore")
        pubsub = emulator("pubsub")
        self.secret_manager = SecretManagerTestServer(port=free_port()).start()
        self.first_written: dict[str, float] = {}
        self.secret_manager.observers.append(self._observe)
        self.firestore_host = firestore.host
        self.pubsub_host = pubsub.host
        self.sm_proxy = TcpProxy(self.secret_manager.address).start()
        self.fs_proxy = TcpProxy(firestore.host).start()
        self.ps_proxy = TcpProxy(pubsub.host).start()
        self._functions: list[RefresherFunction] = []
        self._clean: RefresherFunction | None = None
        self._create_topic()
        super().__init__(name, workdir, provider, options)

    def _observe(self, method: str, request: Any, _response: Any) -> None:
        if method != "AddSecretVersion":
            return
        with contextlib.suppress(ValueError, AttributeError):
            token = json.loads(bytes(request.payload.data)).get("refresh_token")
            if token:
                self.first_written.setdefault(token, time.time())

    def _create_topic(self) -> None:
        from google.cloud import pubsub_v1

        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
        try:
            publisher = pubsub_v1.PublisherClient()
            publisher.create_topic(name=publisher.topic_path(self.project, "tokenbroker-events"))
        finally:
            if previous is not None:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous

    def _build_runtime(self) -> Runtime:
        return build_runtime(
            Settings(
                backend="gcp",
                gcp_project=self.project,
                secret_manager_endpoint=self.secret_manager.address,
                firestore_emulator_host=self.firestore_host,
                pubsub_topic="tokenbroker-events",
            )
        )

    def backend_env(self) -> dict[str, str]:
        return {
            "TOKENBROKER_BACKEND": "gcp",
            "TOKENBROKER_GCP_PROJECT": self.project,
            "TOKENBROKER_PUBSUB_TOPIC": "tokenbroker-events",
            "TOKENBROKER_SECRET_MANAGER_ENDPOINT": self.sm_proxy.address,
            "TOKENBROKER_METRICS": "off",  # metrics have their own tests (test server)
            "FIRESTORE_EMULATOR_HOST": self.fs_proxy.address,
            "PUBSUB_EMULATOR_HOST": self.ps_proxy.address,
        }

    def _register(self, pairs: list[tuple[Connection, Credential]]) -> None:
        """What ``ConnectionRegistry.register`` leaves (version 1, active, due now), written in
        bulk as ``bench/refresh_throughput.py`` seeds: batched creates of the adapter's own
        ``stored_document`` for the states, then ``put_many`` for the secrets, which moves each
        record's current-version pointer to 1 (the pointer protocol keeps it in the record, so
        the record comes first, as the registry writes it; one by one costs ~0.5 s a connection
        against the emulators on a loaded machine)."""
        from tokenbroker.adapters.gcp.firestore import stored_document
        from tokenbroker.ports import SecretWrite

        state: Any = self.runtime.state
        collection = state.client.collection(state.collection_name)
        now = datetime.now(UTC)
        for start in range(0, len(pairs), 500):  # 500 writes: Firestore's batch limit
            batch = state.client.batch()
            for index, (connection, _) in enumerate(pairs[start : start + 500]):
                # Distinct instants, as one-by-one registration leaves them.
                due = now - timedelta(microseconds=len(pairs) - start - index)
                fresh = RefreshState(status=ConnectionStatus.ACTIVE, next_refresh_at=due)
                batch.create(collection.document(connection.id), stored_document(connection, fresh))
            batch.commit()
        versions = self.runtime.secrets.put_many([SecretWrite(c.id, k, None) for c, k in pairs])
        if any(v != 1 for v in versions):
            raise RuntimeError(f"seeding secrets: {[v for v in versions if v != 1][:3]}")
        pointers = state.current_versions([c.id for c, _ in pairs])
        if any(pointers.get(c.id) != 1 for c, _ in pairs):
            raise RuntimeError("seeding secrets: a record does not point at version 1")

    def force_due(self, ids: Sequence[str]) -> None:
        """``next_refresh_at`` moved to now, in batched updates of the documented field."""
        state: Any = self.runtime.state
        collection = state.client.collection(state.collection_name)
        now = datetime.now(UTC) - timedelta(seconds=1)
        for start in range(0, len(ids), 500):
            batch = state.client.batch()
            for index, cid in enumerate(ids[start : start + 500]):
                due = now - timedelta(microseconds=len(ids) - start - index)
                batch.update(collection.document(cid), {"next_refresh_at": due})
            batch.commit()

    def function(self, what: str = "function", **env: str) -> RefresherFunction:
        function = RefresherFunction(self.env(**env), self.out(what))
        self._functions.append(function)
        return function

    def clean_function(self) -> RefresherFunction:
        """The deployment's ordinary refresher function, started once and reused."""
        if self._clean is None or self._clean.proc.returncode is not None:
            self._clean = self.function("function-clean")
        return self._clean

    def start_tick(
        self, ids: Sequence[str] | None = None, *, failpoints: str | None = None, **env: str
    ) -> Running:
        if not failpoints and not env:
            return self.clean_function().start_tick(ids)
        if failpoints:
            env["TOKENBROKER_FAILPOINTS"] = failpoints
        function = self.function("function-" + (failpoints or "env").replace(":", "-"), **env)
        running = function.start_tick(ids)

        def finish() -> TickResult:
            try:
                return running.finish()
            finally:
                function.stop()

        return Running(running.pid, finish)

    def write_time(self, cid: str, version: int, token: str) -> float | None:  # noqa: ARG002
        return self.first_written.get(token)

    def close(self) -> None:
        for function in self._functions:
            with contextlib.suppress(Exception):
                function.stop()
        super().close()
        for proxy in (self.sm_proxy, self.fs_proxy, self.ps_proxy):
            with contextlib.suppress(Exception):
                proxy.stop()
        with contextlib.suppress(Exception):
            self.secret_manager.stop()


def gcp_skip_reason() -> str | None:
    """Why the gcp deployments cannot run here, or None."""
    from tests.support.emulators import _factory

    for name in ("firestore", "pubsub"):
        reason = _factory(name).skip_reason()
        if reason is not None:
            return reason
    return None


# ---------------------------------------------------------------------------------------------
# Helpers for scenarios
# ---------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def rotations(ledger: Ledger, ids: Iterable[str], since: float | None = None) -> int:
    return sum(1 for e in ledger.select(ids, since) if e.rotated)


_TOKENISH = re.compile(rb"[A-Za-z0-9_\-\.~+/]{20,}")


def leaked(tokens: set[str], paths: Iterable[Path]) -> list[str]:
    """Files among ``paths`` holding any of ``tokens``: every token-like run of each file is
    looked up in the set (linear in the bytes, whatever the number of tokens)."""
    wanted = {t.encode() for t in tokens}
    found = []
    for path in paths:
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            for match in _TOKENISH.finditer(data):
                run = match.group(0)
                if run in wanted or any(part in wanted for part in re.split(rb"[.~+/]", run)):
                    found.append(path.name)
                    break
    return found


@contextlib.contextmanager
def workspace(base: Path | None = None) -> Iterator[Path]:
    """A scratch directory outside pytest's base temp: the session's leak scan compares every
    token issued against every file there, and the suite issues thousands (it runs its own
    set-based scan over its own outputs instead, :func:`leaked`)."""
    path = Path(tempfile.mkdtemp(prefix="tokenbroker-chaos-", dir=base))
    try:
        yield path
    finally:
        import shutil

        if not os.environ.get("TOKENBROKER_CHAOS_KEEP"):  # kept for diagnosis when set
            shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "ANSWERED",
    "DURABLE",
    "KILL_POINTS",
    "NOT_SENT",
    "ON_THE_WIRE",
    "Deployment",
    "EmbeddedDeployment",
    "GcpDeployment",
    "Kill",
    "Options",
    "Proc",
    "Provider",
    "RefresherFunction",
    "Running",
    "ScenarioResult",
    "TickResult",
    "Verdict",
    "gcp_skip_reason",
    "leaked",
    "log",
    "rotations",
    "stage_at",
    "summarize",
    "wait_until",
    "workspace",
]
