"""The fault suite's scenarios, at two sizes: ``QUICK`` (CI, ``tests/system/test_chaos.py``)
and ``FULL`` (``bench/chaos.py``).

Each scenario builds its own deployment (its own store, fault proxy and ledger, so scenarios
can run side by side), does what an adversarial operator or a failing production would, and
returns a :class:`~.chaos.ScenarioResult`: the ledger's counts, the lost connections with
where each kill landed, loss-window samples, and ``checks`` -- named properties, each True
when it held. The checks state the goals of issue 8; the tests decide which must hold today
and which are expected to fail until the fix that makes them hold lands.

Scenarios (``backend`` in brackets):

* ``provider_faults`` [embedded]: one connection per fault kind, plus a control connection
  refreshed in the same tick, each pair in a tick of its own (so one crash cannot hide what
  another fault does), ticks run side by side in this process. Checks per fault: no crash,
  the control unaffected, the right class, the stored credential never overwritten by a bad
  answer, retries bounded, nothing lost once the provider is healthy again.
* ``kill_points`` [embedded, gcp]: SIGKILL at each step boundary (failpoints), one group of
  connections per boundary; a clean tick right after the crashes, another after the lease
  TTL. Checks: nothing lost but what was on the wire; leases recovered at once; no consumed
  refresh token presented by the clean ticks.
* ``random_kills`` [embedded ``serve``, gcp function worker]: external SIGKILL at a random
  moment of a refresh burst, round after round; then clean ticks.
* ``sigstop_past_lease`` [embedded]: a refresher paused (SIGSTOP) during its retry backoff
  until its lease expired, another one refreshing meanwhile, then SIGCONT.
* ``answer_past_lease`` [embedded]: answers delayed past the lease while another refresher
  takes over.
* ``races`` [embedded, gcp]: several refresher processes ticking at once, rounds of all
  connections due: ``invalid_grant`` and refreshes per connection per round.
* ``store_outages`` [gcp: Secret Manager stopped (its data kept), Firestore unreachable,
  Secret Manager hung; embedded: the disk full (a small tmpfs in a private mount namespace,
  filled), an I/O error on every growing write (RLIMIT_FSIZE set from outside), the database
  write-locked by another process] mid-tick; then clean ticks. A read-only remount mid-tick
  cannot be injected: the kernel refuses it (EBUSY) while the database is open for writing.
* ``slow_stores`` [gcp]: Firestore, Secret Manager and Pub/Sub slow (every chunk delayed).
* ``overload`` [embedded]: a provider taking two requests at a time with a small accept
  queue; waiting requests are still processed after their client gave up.
* ``clock_steps`` [embedded]: a second refresher whose clock is off (+/-120 s, +90 s).
* ``serve_liveness`` [embedded]: ``serve`` after an answer that crashes a tick: does it keep
  refreshing (or exit non-zero)?
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.support import fault_proxy as fp
from tests.support.chaos import (
    ANSWER_ON_THE_WIRE,
    ANSWERED,
    BIN,
    CAPTURE_ENV,
    KILL_POINTS,
    ON_THE_WIRE,
    Deployment,
    EmbeddedDeployment,
    GcpDeployment,
    Kill,
    Options,
    Provider,
    Running,
    ScenarioResult,
    TickResult,
    _proc_result,
    children,
    gcp_skip_reason,
    leaked,
    log,
    rotations,
    summarize,
    wait_until,
    workspace,
)
from tests.support.oidc import free_port
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.model import ConnectionStatus

# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    name: str
    kill_group: int = 12
    kill_points_embedded: tuple[str, ...] = KILL_POINTS
    kill_points_gcp: tuple[str, ...] = ("answer.received", "secret.written")
    random_rounds_embedded: int = 3
    random_rounds_gcp: int = 1
    random_group: int = 10
    race_processes_embedded: int = 4
    race_processes_gcp: int = 2
    race_connections_embedded: int = 60
    race_connections_gcp: int = 30
    race_rounds: int = 2
    outage_group: int = 20
    #: How long a store stays down or hung (the full size: longer than a lease).
    outage_seconds: float = 4.0
    slow_group: int = 20
    slow_delay: float = 0.05
    slow_seconds: float = 0.0
    overload_connections: int = 40
    overload_ticks: int = 3
    clock_offsets: tuple[float, ...] = (120.0, -120.0)
    stale_group: int = 6
    #: The gcp store outages to inject (Secret Manager stopped, Firestore down, SM hung).
    gcp_outages: tuple[str, ...] = ("sm-stopped",)
    #: Scenarios run side by side (most of their time is spent waiting for leases).
    workers: int = 7
    #: Scenarios left out at this size.
    skip: tuple[str, ...] = ("random_kills[gcp]",)


QUICK = Size("quick")
FULL = Size(
    "full",
    kill_group=40,
    kill_points_gcp=KILL_POINTS,
    random_rounds_embedded=10,
    random_rounds_gcp=5,
    random_group=30,
    race_processes_embedded=4,
    race_processes_gcp=4,
    race_connections_embedded=200,
    race_connections_gcp=200,
    race_rounds=5,
    outage_group=100,
    outage_seconds=90.0,
    slow_group=100,
    slow_delay=0.2,
    slow_seconds=90.0,
    overload_connections=200,
    clock_offsets=(120.0, -120.0, 90.0),
    stale_group=20,
    gcp_outages=("sm-stopped", "firestore-down", "sm-hung"),
    workers=4,
    skip=(),
)

#: A lease the refreshers under test hold (the settings' default): stuck leases clear after it.
LEASE = 30.0
#: The lease of the stale-holder scenarios' first refresher (launcher; the tick keeps 15 s of
#: it before presenting, so it still sends within the first 5 s).
SHORT_LEASE = 20.0


@dataclass
class Context:
    provider: Provider
    workdir: Path
    size: Size
    gcp_reason: str | None
    deployments: list[Deployment] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def embedded(self, name: str, options: Options | None = None) -> EmbeddedDeployment:
        deployment = EmbeddedDeployment(name, self.workdir, self.provider, options or Options())
        with self.lock:
            self.deployments.append(deployment)
        return deployment

    def gcp(self, name: str, options: Options | None = None) -> GcpDeployment:
        if self.gcp_reason is not None:
            raise Skipped(self.gcp_reason)
        deployment = GcpDeployment(name, self.workdir, self.provider, options or Options())
        with self.lock:
            self.deployments.append(deployment)
        return deployment

    def deployment(self, backend: str, name: str, options: Options | None = None) -> Deployment:
        return self.gcp(name, options) if backend == "gcp" else self.embedded(name, options)


class Skipped(Exception):
    """A scenario cannot run here (a missing tool); the reason is recorded."""


def _slug(point: str) -> str:
    return point.replace(".", "-")


def _wait_lease(since: float, lease: float = LEASE) -> None:
    remaining = since + lease + 2.0 - time.time()
    if remaining > 0:
        time.sleep(remaining)


# ---------------------------------------------------------------------------------------------
# Provider faults
# ---------------------------------------------------------------------------------------------

TRANSIENT = "transient"
BOUNDED = "transient, bounded backoff"
PERMANENT = "permanent"
#: The answer carried a rotated refresh token: it must be kept.
KEPT = "kept"
#: The provider rotated and the answer never arrived: never replay the consumed token.
AMBIGUOUS = "ambiguous"

PROVIDER_FAULTS: dict[str, tuple[fp.Fault, str]] = {
    "timeout_before": (fp.timeout_before(6.0), TRANSIENT),
    "reset_before": (fp.reset(), TRANSIENT),
    "status_500": (fp.status(500), TRANSIENT),
    "status_502_html": (fp.status(502, body="<html><h1>502 Bad Gateway</h1></html>"), TRANSIENT),
    "status_503": (fp.status(503), TRANSIENT),
    "429_retry_after": (fp.rate_limited("1"), TRANSIENT),
    "429_no_retry_after": (fp.rate_limited(), TRANSIENT),
    "malformed_json": (fp.malformed_json(), TRANSIENT),
    "html_200": (fp.html_200(), TRANSIENT),
    "error_200_temporarily_unavailable": (fp.error_200("temporarily_unavailable"), TRANSIENT),
    "error_200_invalid_grant": (fp.error_200("invalid_grant"), PERMANENT),
    "retry_after_far_date": (fp.status(503, retry_after="Fri, 31 Dec 9999 23:59:59 GMT"), BOUNDED),
    "retry_after_huge": (fp.rate_limited("99999999999"), BOUNDED),
    "retry_after_non_ascii": (fp.status(503, retry_after="\u00fc"), BOUNDED),
    "retry_after_negative": (fp.status(503, retry_after="-30"), BOUNDED),
    "slow_answer": (fp.slow(1.5), KEPT),
    "expires_in_missing": (fp.expires_in(None), KEPT),
    "expires_in_infinity": (fp.expires_in("Infinity"), KEPT),
    "expires_in_1e15": (fp.expires_in("1e15"), KEPT),
    "expires_in_1e12": (fp.expires_in("1e12"), KEPT),
    "expires_in_zero": (fp.expires_in("0"), KEPT),
    "expires_in_negative": (fp.expires_in("-60"), KEPT),
    "expires_in_string": (fp.expires_in('"soon"'), KEPT),
    "error_200_with_tokens": (fp.error_200("server_error", with_tokens=True), KEPT),
    "timeout_after_rotation": (fp.timeout_after(6.0), AMBIGUOUS),
    "reset_after_rotation": (fp.reset(after=True), AMBIGUOUS),
    "html_200_after_rotation": (fp.html_200(after=True), AMBIGUOUS),
    "malformed_json_after_rotation": (fp.malformed_json(after=True), AMBIGUOUS),
}

#: The checks each provider-fault case records (``"<case>: <check>"``).
FAULT_CHECKS = ("no crash", "control unaffected", "class", "never overwritten", "retries bounded",
                "not lost")  # fmt: skip
FAULT_OPTIONS = Options(concurrency=4, http_timeout=5.0, retry_attempts=3, retry_base_delay=0.05)


def _in_process_tick(deployment: EmbeddedDeployment, ids: Sequence[str]) -> str | None:
    """One tick in this process with the deployment's refresher settings; returns the crash
    (an exception that is not the library's answer), if any."""
    options = deployment.options
    runtime = build_runtime(
        Settings(
            backend="embedded",
            state_dir=deployment.state_dir,
            concurrency=options.concurrency,
            http_timeout=options.http_timeout,
            retry_attempts=options.retry_attempts,
            retry_base_delay=options.retry_base_delay,
            lease_ttl_seconds=options.lease_ttl,
            min_lead_seconds=options.min_lead,
        )
    )
    try:
        asyncio.run(runtime.tick(connection_ids=list(ids)))
    except TokenBrokerError:
        return None  # an answer (a store failed), not a crash
    except Exception as error:  # noqa: BLE001 - a crash is what the fault cases look for
        return f"{type(error).__name__}: {error}"[:300]
    finally:
        runtime.close()
    return None


def _fault_case(ctx: Context, case: str, result: ScenarioResult) -> None:
    fault, expected = PROVIDER_FAULTS[case]
    options = FAULT_OPTIONS
    deployment = ctx.embedded("fault-" + case.replace("_", "-"), options)
    target, control = deployment.seed(case.replace("_", "-"), 2)
    deployment.tick([target, control])  # in use: each serves an access token
    before = deployment.stored([target])[target]
    # Every attempt of the target gets the fault: what the class is cannot depend on retries.
    deployment.proxy.script_for(target, [fault] * options.retry_attempts)
    started = time.time()
    crashed = _in_process_tick(deployment, [target, control])
    faulty = deployment.proxy.ledger.summary([target, control], since=started)
    records = deployment.records([target, control])
    after = deployment.stored([target]).get(target)
    first = {v.cid: v for v in deployment.verify([target, control])}
    state = records[target].state if target in records else None

    def check(name: str, held: bool) -> None:
        result.check(f"{case}: {name}", held)

    check("no crash", crashed is None)
    check("control unaffected", not first[control].lost and rotations(
        deployment.proxy.ledger, [control], started) == 1)  # fmt: skip
    if expected in {TRANSIENT, BOUNDED}:
        check("class", state is not None and state.status is ConnectionStatus.ACTIVE
              and state.consecutive_failures >= 1 and bool(state.last_error))  # fmt: skip
    elif expected == PERMANENT:
        check("class", state is not None and state.status is ConnectionStatus.NEEDS_REAUTH)
    elif expected == KEPT:
        check("class", not first[target].lost)
    else:
        check("class", faulty["reuse"] == 0)
    if fault.forwards:
        # A new refresh token was issued: the stored one may only be replaced by it (or a
        # later one of the same grant), never by anything else the answer held.
        stored_token = after.credential.refresh_token if after else None
        lineage = deployment.proxy.ledger.lineage_of(stored_token.reveal() if stored_token
                                                     else None)  # fmt: skip
        check("never overwritten", lineage is not None and lineage[0] == target)
    else:
        check("never overwritten", after is not None and after.version == before.version
              and after.credential == before.credential)  # fmt: skip
    if expected == BOUNDED:
        horizon = datetime.now(UTC) + timedelta(days=1)
        check("class", state is not None and state.next_refresh_at is not None
              and state.next_refresh_at <= horizon)  # fmt: skip
    target_exchanges = deployment.proxy.ledger.select([target], since=started)
    check("retries bounded", len(target_exchanges) <= options.retry_attempts)

    deployment.proxy.clear()
    clean = time.time()
    _in_process_tick(deployment, [target, control])
    final = deployment.verify([target, control])
    if expected != AMBIGUOUS:
        check("not lost", not any(v.lost for v in final))
    deployment.figures(result, [target, control], since=started)
    result.notes.setdefault("cases", {})[case] = {
        "expected": expected,
        "crash": crashed,
        "status": state.status.value if state else None,
        "last_error": state.last_error if state else None,
        "next_refresh_at": state.next_refresh_at.isoformat() if state and state.next_refresh_at
        else None,
        "attempts": len(target_exchanges),
        "reuse_in_tick": faulty["reuse"],
        "after_clean_tick": {v.cid.rsplit("-", 1)[1]: v.why for v in final},
        "clean_tick_invalid_grant": deployment.proxy.ledger.summary(
            [target, control], since=clean)["invalid_grant"],
    }  # fmt: skip


def provider_faults(ctx: Context) -> list[ScenarioResult]:
    result = ScenarioResult("provider_faults", "embedded")
    with ThreadPoolExecutor(6) as pool:
        futures = {case: pool.submit(_fault_case, ctx, case, result) for case in PROVIDER_FAULTS}
        for case, future in futures.items():
            try:
                future.result()
            except Exception:  # noqa: BLE001 - one case's harness failure is recorded
                result.notes.setdefault("case_errors", {})[case] = traceback.format_exc()[-2000:]
                for name in FAULT_CHECKS:
                    result.check(f"{case}: {name}", False)
    return [result]


# ---------------------------------------------------------------------------------------------
# Kills
# ---------------------------------------------------------------------------------------------


def _nth(point: str, group: int) -> int:
    """At which pass the failpoint fires: mid-tick for per-connection points, the first commit
    for per-batch ones."""
    per_connection = {"intent.durable", "request.sent", "answer.received"}
    # Early enough that one request at a time fits in the lease's first 30 s.
    return max(1, min(group // 3, 4)) if point in per_connection else 1


def kill_points(ctx: Context, backend: str) -> list[ScenarioResult]:
    points = ctx.size.kill_points_gcp if backend == "gcp" else ctx.size.kill_points_embedded
    result = ScenarioResult(f"kill_points[{backend}]", backend)
    # The killed refreshers send one request at a time, each a second on the wire, and commit
    # far quicker: where a kill lands is then the same on every run (the connection answered
    # at ``answer.received``; one request on the wire at a commit boundary), on a loaded
    # machine too. The clean ticks after them run at the deployment's concurrency.
    deployment = ctx.deployment(backend, f"kills-{backend}", Options(concurrency=16))
    # A commit on the emulators takes up to ~1.5 s on a loaded machine.
    deployment.proxy.latency(3.0 if backend == "gcp" else 1.0)
    groups = {p: deployment.seed(_slug(p), ctx.size.kill_group) for p in points}
    everything = [cid for ids in groups.values() for cid in ids]
    # Each serves an access token (five minutes) before the kills, as a connection in use does:
    # one whose outcome a kill leaves unknown keeps serving it, and its refresh token is
    # presented again only in the last two minutes -- after this scenario.
    deployment.tick(everything)
    deployment.force_due(everything)
    kills: list[Kill] = []

    def start(point: str) -> Running:
        ids = groups[point]
        return deployment.start_tick(
            ids, failpoints=f"{point}:{_nth(point, len(ids))}", TOKENBROKER_CONCURRENCY="1"
        )

    # All at once, one process per boundary, each on its own connections.
    with ThreadPoolExecutor(len(groups)) as pool:
        runs = dict(zip(groups, pool.map(start, groups), strict=True))
    for point, ids in groups.items():
        outcome = runs[point].finish()
        kills.append(Kill(point, outcome.at, tuple(ids), outcome.killed))
        if not outcome.killed:
            result.notes.setdefault("not_landed", []).append(point)
        log(f"{result.name}: {point}: {'killed' if outcome.killed else 'did not land'}")
    deployment.proxy.latency(0.0)
    right_after = time.time()
    deployment.tick(everything)
    presented_at_once = {
        e.lineage for e in deployment.proxy.ledger.select(everything, since=right_after)
    }
    _wait_lease(max(k.at for k in kills))
    after_lease = time.time()
    deployment.tick(everything)
    presented = {e.lineage for e in deployment.proxy.ledger.select(everything, since=after_lease)}
    replays = deployment.proxy.ledger.summary(everything, since=right_after)
    at_risk = deployment.at_risk(everything)
    # A staged answer is settled (committed without presenting anything) by the next holder.
    unsettled = deployment.with_intent(everything)
    verdicts = {v.cid: v for v in deployment.figures(result, everything, kills)}
    for point, ids in groups.items():
        landed = any(k.point == point and k.landed for k in kills)
        lost = [verdicts[c] for c in ids if verdicts[c].lost]
        result.check(f"{point}: kill landed", landed)
        # An answer in hand but not yet durable is lost with the process (the loss window):
        # the kill points with the request or its answer on the wire may lose it -- and the
        # connection then keeps serving its access token, at risk, never presented blindly.
        allowed = {ON_THE_WIRE, ANSWERED} if point in ANSWER_ON_THE_WIRE else {ON_THE_WIRE}
        result.check(
            f"{point}: nothing lost but what was on the wire",
            landed and all(v.stage in allowed for v in lost),
        )
        result.check(f"{point}: the lost ones are at risk, still served",
                     all(v.cid in at_risk for v in lost))  # fmt: skip
        # Those whose outcome is not unknown are refreshed (or their staged answer settled)
        # by the first tick after one lease (30 s), however their holder died.
        alive = [c for c in ids if not verdicts[c].lost and c not in at_risk]
        recovered = landed and all(c in presented or c not in unsettled for c in alive)
        result.check(f"{point}: leases recovered within one lease", recovered)
        result.notes.setdefault("lost", {})[point] = {
            "lost": len(lost),
            "stages": dict(Counter(v.stage for v in lost)),
            "at_risk": sum(1 for c in ids if c in at_risk),
            "not_presented_right_after": sum(1 for c in alive if c not in presented_at_once),
            "not_presented_after_one_lease": sum(1 for c in alive if c not in presented),
            "unsettled_after_one_lease": sum(1 for c in alive if c in unsettled),
        }
    result.check("no consumed token presented after the crashes", replays["reuse"] == 0)
    result.notes["replays_after_crash"] = replays["reuse"]
    return [result]


def random_kills(ctx: Context, backend: str) -> list[ScenarioResult]:
    rounds = ctx.size.random_rounds_gcp if backend == "gcp" else ctx.size.random_rounds_embedded
    result = ScenarioResult(f"random_kills[{backend}]", backend)
    deployment = ctx.deployment(backend, f"random-{backend}", Options(concurrency=4))
    deployment.proxy.latency(0.2)
    rng = random.Random(8)
    kills: list[Kill] = []
    everything: list[str] = []
    function = deployment.clean_function() if isinstance(deployment, GcpDeployment) else None
    for index in range(rounds):
        ids = deployment.seed(f"rnd{index}", ctx.size.random_group)
        # In use: each serves an access token, so an unknown outcome keeps serving it.
        deployment.tick(ids)
        deployment.force_due(ids)
        burst = time.time()
        everything.extend(ids)
        span = 0.2 * ctx.size.random_group / 4
        if function is not None:
            worker = function.wait_worker()
            runner = threading.Thread(target=function.tick, args=(ids,), daemon=True)
            runner.start()
            wait_until(
                lambda ids=ids, burst=burst: bool(deployment.proxy.ledger.select(ids, since=burst)),
                60,
            )
            time.sleep(rng.uniform(0.0, span))
            at = time.time()
            if worker is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
            runner.join(120)
            kills.append(Kill("random", at, tuple(ids), worker is not None))
        else:
            serve = deployment.cli(
                "serve", "--port", str(free_port()), "--interval", "1", what=f"serve-{index}"
            )
            wait_until(
                lambda ids=ids, burst=burst: bool(deployment.proxy.ledger.select(ids, since=burst)),
                60,
            )
            time.sleep(rng.uniform(0.0, span))
            at = serve.signal(signal.SIGKILL)
            serve.wait(10)
            kills.append(Kill("random", at, tuple(ids), serve.killed))
    _wait_lease(max(k.at for k in kills))
    deployment.tick(everything)
    deployment.figures(result, everything, kills)
    by_stage = result.lost_by_stage()
    # A random kill may catch an answer in hand, not yet durable (the loss window) too.
    result.check("nothing lost but what was on the wire",
                 set(by_stage) <= {ON_THE_WIRE, ANSWERED})  # fmt: skip
    at_risk = deployment.at_risk(everything)
    result.check("the lost ones are at risk, still served",
                 all(v.cid in at_risk for v in result.lost))  # fmt: skip
    return [result]


def _first_attempts_done(deployment: Deployment, ids: Sequence[str]) -> bool:
    return len({e.lineage for e in deployment.proxy.ledger.select(ids)}) >= len(ids)


def sigstop_past_lease(ctx: Context) -> list[ScenarioResult]:
    """A pauses in its retry backoff, past its lease; B refreshes; A resumes and retries."""
    result = ScenarioResult("sigstop_past_lease", "embedded")
    group = ctx.size.stale_group
    # Every first attempt at once, so the pause catches all of them in their backoff.
    deployment = ctx.embedded("sigstop", Options(concurrency=group, retry_base_delay=3.0))
    ids = deployment.seed("stop", group)
    # Retry-After makes every backoff last at least 5 s: the pause lands inside all of them.
    for cid in ids:
        deployment.proxy.script_for(cid, [fp.status(503, retry_after="5")])
    first = deployment.launcher("--lease-ttl", str(SHORT_LEASE), *ids, what="paused")
    wait_until(lambda: _first_attempts_done(deployment, ids), 60)
    stopped_at = first.signal(signal.SIGSTOP)
    _wait_lease(stopped_at, SHORT_LEASE)
    second = deployment.tick(ids)
    resumed_at = first.signal(signal.SIGCONT)
    first.wait(120)
    after = deployment.proxy.ledger.summary(ids, since=resumed_at)
    deployment.figures(result, ids, [Kill("sigstop", stopped_at, tuple(ids))])
    result.notes.update(second=second.summary, presented_after_resume=after["presented"],
                        replays_after_resume=after["reuse"])  # fmt: skip
    result.check("the paused holder presents nothing after its lease", after["presented"] == 0)
    result.check("nothing lost", result.connections_lost == 0)
    return [result]


def answer_past_lease(ctx: Context) -> list[ScenarioResult]:
    """A's answers are delayed past its lease; B takes over meanwhile."""
    result = ScenarioResult("answer_past_lease", "embedded")
    group = ctx.size.stale_group
    deployment = ctx.embedded("late-answer", Options(concurrency=group, http_timeout=120.0))
    ids = deployment.seed("late", group)
    # The answers arrive well after the lease ran out and the next refresher started (its
    # process start included, on a loaded machine).
    delay = SHORT_LEASE + 25
    for cid in ids:
        deployment.proxy.script_for(cid, [fp.slow(delay)])
    first = deployment.launcher("--lease-ttl", str(SHORT_LEASE), *ids, what="slow-holder")
    wait_until(lambda: _first_attempts_done(deployment, ids), 60)
    # The claim came just before the first request: the lease ends by then + its TTL.
    sent = min(e.started_at for e in deployment.proxy.ledger.select(ids))
    _wait_lease(sent, SHORT_LEASE)
    takeover = time.time()
    second = deployment.tick(ids)
    first.wait(180)
    during = deployment.proxy.ledger.summary(ids, since=takeover)
    deployment.figures(result, ids)
    result.notes.update(second=second.summary, first=first.last_json(),
                        replays=during["reuse"])  # fmt: skip
    result.check("no consumed token presented", result.reuse == 0)
    result.check("nothing lost", result.connections_lost == 0)
    return [result]


# ---------------------------------------------------------------------------------------------
# Races
# ---------------------------------------------------------------------------------------------


def races(ctx: Context, backend: str) -> list[ScenarioResult]:
    gcp = backend == "gcp"
    processes = ctx.size.race_processes_gcp if gcp else ctx.size.race_processes_embedded
    count = ctx.size.race_connections_gcp if gcp else ctx.size.race_connections_embedded
    result = ScenarioResult(f"races[{backend}]", backend)
    deployment = ctx.deployment(backend, f"race-{backend}", Options(concurrency=32))
    deployment.proxy.latency(0.05)
    ids = deployment.seed("race", count)
    # Each process claims a share, so they refresh side by side rather than one taking all.
    share = str(-(-count // processes))
    functions = (
        [deployment.function(f"race-fn{i}", TOKENBROKER_TICK_LIMIT=share) for i in range(processes)]
        if isinstance(deployment, GcpDeployment)
        else []
    )
    per_round = []
    for index in range(ctx.size.race_rounds):
        if index:
            deployment.force_due(ids)
        started = time.time()
        if functions:
            with ThreadPoolExecutor(len(functions)) as pool:
                outcomes = list(pool.map(lambda f: f.tick(), functions))
        else:
            procs = [deployment.cli("--json", "refresh", what=f"race-{index}-{i}",
                                    TOKENBROKER_TICK_LIMIT=share)
                     for i in range(processes)]  # fmt: skip
            for proc in procs:
                proc.wait(600)
            outcomes = [_proc_result(p) for p in procs]
        counts = deployment.proxy.ledger.summary(ids, since=started)
        by_connection = counts["refreshes_by_lineage"]
        per_round.append({
            "invalid_grant": counts["invalid_grant"],
            "refreshed_once": sum(1 for c in ids if by_connection.get(c) == 1),
            "refreshed_twice_or_more": sum(1 for c in ids if by_connection.get(c, 0) > 1),
            "not_refreshed": sum(1 for c in ids if c not in by_connection),
            "claimed_by_process": [(o.summary or {}).get("claimed") for o in outcomes],
        })  # fmt: skip
    deployment.figures(result, ids)
    result.notes["rounds"] = per_round
    result.check("no invalid_grant", result.invalid_grant == 0)
    result.check("each due connection refreshed exactly once per round",
                 all(r["refreshed_once"] == len(ids) for r in per_round))  # fmt: skip
    result.check("nothing lost", result.connections_lost == 0)
    return [result]


# ---------------------------------------------------------------------------------------------
# Store outages and slow stores
# ---------------------------------------------------------------------------------------------


@dataclass
class Outage:
    """One store fault injected into a tick, waiting to be settled (caught up and judged)."""

    name: str
    deployment: Deployment
    ids: list[str]
    started: float
    failed_at: float
    outcome: TickResult
    presented_while_failed: int
    #: A store that failed (must be reported) rather than one that was only slow.
    failure: bool = True


def _inject(
    ctx: Context,
    deployment: Deployment,
    name: str,
    fail: Callable[[Running], None],
    heal: Callable[[Running], None],
    *,
    seconds: float,
    start: Callable[[list[str]], Running] | None = None,
    failure: bool = True,
    count: int | None = None,
) -> Outage:
    """Fail a store once a third of a tick's refreshes are in, heal it ``seconds`` later, and
    let the tick finish."""
    ids = deployment.seed(name, count or ctx.size.outage_group)
    deployment.tick(ids)  # in use: each serves an access token (five minutes)
    deployment.force_due(ids)
    deployment.proxy.latency(0.2)
    started = time.time()
    running = (start or deployment.start_tick)(ids)
    # A third of this tick's refreshes in (not counting the one that gave each its token).
    wait_until(lambda: rotations(deployment.proxy.ledger, ids, started) >= len(ids) // 3, 120)
    failed_at = time.time()
    fail(running)
    time.sleep(seconds)
    presented = deployment.proxy.ledger.summary(ids, since=failed_at)["presented"]
    heal(running)
    outcome = running.finish()
    deployment.proxy.latency(0.0)
    return Outage(name, deployment, ids, started, failed_at, outcome, presented, failure)


def _settle(result: ScenarioResult, outages: Sequence[Outage]) -> None:
    """After the lease, a clean tick per outage; then the verdicts and the checks."""
    if not outages:
        return
    _wait_lease(max(o.started for o in outages))
    for outage in outages:
        deployment, ids = outage.deployment, outage.ids
        caught_up_at = time.time()
        deployment.tick(ids)
        after = deployment.proxy.ledger.summary(ids, since=caught_up_at)
        kill = Kill(f"store:{outage.name}", outage.failed_at, tuple(ids))
        verdicts = deployment.figures(result, ids, [kill])
        summary = outage.outcome.summary
        result.notes[outage.name] = {
            "tick": summary or {"returncode": outage.outcome.returncode,
                                "tail": outage.outcome.tail[-400:]},
            "presented_while_failed": outage.presented_while_failed,
            "caught_up": after["accepted"],
            # Each lost connection's exchanges, relative to the failure (for diagnosis).
            "lost": {
                v.cid: [(round(e.started_at - outage.failed_at, 2), e.generation, e.answer,
                         e.rotated, e.reuse) for e in deployment.proxy.ledger.select([v.cid])]
                for v in verdicts if v.lost
            },
        }  # fmt: skip
        if outage.failure:
            reported = outage.outcome.killed or outage.outcome.returncode not in (0, 200) or (
                summary is not None and not _summary_ok(summary))  # fmt: skip
            # SQLite can keep writing into WAL pages it already allocated on a full disk: a
            # tick whose every write succeeded has no failure to report, only the truth to
            # tell (everything it counted refreshed, nothing lost).
            kept = (
                summary is not None and _summary_ok(summary) and not any(v.lost for v in verdicts)
            )
            result.check(f"{outage.name}: failure reported", reported or kept)
        elif not outage.name.startswith("slow-"):
            # Held (a lock, a hang), not failed: nothing can be stored meanwhile, so nothing
            # should be presented beyond what was already in flight.
            concurrency = deployment.options.concurrency
            result.check(f"{outage.name}: presenting pauses",
                         outage.presented_while_failed <= concurrency)  # fmt: skip
        result.check(f"{outage.name}: crash-free", not outage.outcome.crashed)
        result.check(f"{outage.name}: nothing lost", not any(v.lost for v in verdicts))


def _summary_ok(summary: dict[str, Any]) -> bool:
    failed = summary.get("failed") or {}
    return not (
        failed.get("transient") or failed.get("permanent") or summary.get("uncommitted")
        or summary.get("lease_lost") or summary.get("events_lost") or summary.get("error")
    )  # fmt: skip


def store_outages_gcp(ctx: Context) -> list[ScenarioResult]:
    """Secret Manager stopped (its data kept), Firestore unreachable, Secret Manager hung."""
    result = ScenarioResult("store_outages[gcp]", "gcp")
    deployment = ctx.gcp("outages-gcp", Options(concurrency=4))
    assert isinstance(deployment, GcpDeployment)
    seconds = ctx.size.outage_seconds
    sm, fs, smp = deployment.secret_manager, deployment.fs_proxy, deployment.sm_proxy
    faults: dict[str, tuple[Callable[[Running], None], Callable[[Running], None]]] = {
        "sm-stopped": (lambda _: sm.stop(), lambda _: sm.start()),
        "firestore-down": (lambda _: fs.set_mode("down"), lambda _: fs.set_mode("pass")),
        "sm-hung": (lambda _: smp.set_mode("blackhole"), lambda _: smp.set_mode("pass")),
    }
    outages = [
        _inject(ctx, deployment, name, *faults[name], seconds=seconds, failure=name != "sm-hung")
        for name in ctx.size.gcp_outages
    ]
    _settle(result, outages)
    return [result]


def mount_skip_reason() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        return "cannot make a private mount namespace here (needs CAP_SYS_ADMIN)"
    return None


def _namespaced(deployment: EmbeddedDeployment, size: str) -> Callable[[list[str]], Running]:
    """Start ``tokenbroker refresh`` on a copy of the state directory on a small tmpfs in a
    private mount namespace (the harness fills it through ``/proc/PID/root``); the state is
    copied back when the process ends. The harness's own handle on the database is closed
    meanwhile."""
    mount = deployment.workdir / "mnt"
    script = (
        'set -u; mount -t tmpfs -o size="$1" tmpfs "$2"; cp -a "$3"/. "$2"/; shift 3; '
        '"$@"; rc=$?; rm -f "$MOUNT/filler"; cp -a "$MOUNT"/. "$STATE"/; exit $rc'
    )

    def start(ids: list[str]) -> Running:
        mount.mkdir(parents=True, exist_ok=True)
        deployment.runtime.close()
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                size, str(mount), str(deployment.state_dir), str(BIN / "tokenbroker"), "--json",
                "refresh", *ids]  # fmt: skip
        proc = deployment.process(argv, "namespaced-refresh", TOKENBROKER_STATE_DIR=str(mount),
                                  MOUNT=str(mount), STATE=str(deployment.state_dir))  # fmt: skip

        def finish() -> TickResult:
            outcome = _proc_result(proc)
            deployment.runtime = build_runtime(
                Settings(backend="embedded", state_dir=deployment.state_dir)
            )
            return outcome

        return Running(proc.pid, finish)

    return start


def _fill(running: Running, mount: Path) -> None:
    """Fill the refresher's private tmpfs -- only if it is mounted in its namespace: never the
    directory beneath it, which is on the real disk."""
    mounts = Path(f"/proc/{running.pid}/mounts")
    with contextlib.suppress(OSError):
        if not any(
            line.split()[1:3] == [str(mount), "tmpfs"] for line in mounts.read_text().splitlines()
        ):
            raise RuntimeError(f"{mount} is not a tmpfs in the refresher's namespace: not filled")
    filler = Path(f"/proc/{running.pid}/root") / str(mount).lstrip("/") / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as handle:
        while True:
            handle.write(b"\0" * (1 << 20))
            handle.flush()


def _unfill(running: Running, mount: Path) -> None:
    """The operator frees the disk: the filler goes (the refresher is still running)."""
    filler = Path(f"/proc/{running.pid}/root") / str(mount).lstrip("/") / "filler"
    with contextlib.suppress(OSError):
        filler.unlink()


def _file_size_limit(running: Running, limit: str) -> None:
    """RLIMIT_FSIZE of the refresher, set from outside (prlimit(2)): past it every write that
    grows a file fails with EFBIG (Python ignores SIGXFSZ) -- SQLite's I/O error."""
    pid = running.pid
    targets = [pid] if pid is not None else []
    targets += [c for p in list(targets) for c in children(p)]
    for target in targets:
        # The soft limit only: a hard limit of 1 could not be raised again (the heal).
        subprocess.run(["prlimit", "--pid", str(target), f"--fsize={limit}:unlimited"],
                       check=False, capture_output=True)  # fmt: skip


def store_outages_embedded(ctx: Context) -> list[ScenarioResult]:
    """The disk full mid-tick (a small tmpfs, filled), an I/O error on every write that grows
    a file (RLIMIT_FSIZE), the database write-locked by another process (a slow store)."""
    result = ScenarioResult("store_outages[embedded]", "embedded")
    outages = []
    seconds = ctx.size.outage_seconds
    reason = mount_skip_reason()
    if reason is None:
        full = ctx.embedded("sqlite-full", Options(concurrency=4))
        mount = full.workdir / "mnt"
        outages.append(_inject(ctx, full, "sqlite-full", lambda r: _fill(r, mount),
                               lambda r: _unfill(r, mount), seconds=seconds,
                               start=_namespaced(full, "48m")))  # fmt: skip
    else:
        result.notes["sqlite-full"] = f"skipped: {reason}"
    if shutil.which("prlimit") is not None:
        broken = ctx.embedded("sqlite-io-error", Options(concurrency=4))
        outages.append(_inject(ctx, broken, "sqlite-io-error",
                               lambda r: _file_size_limit(r, "1"),
                               lambda r: _file_size_limit(r, "unlimited"),
                               seconds=seconds))  # fmt: skip
    else:
        result.notes["sqlite-io-error"] = "skipped: prlimit (util-linux) not installed"
    locked = ctx.embedded("sqlite-locked", Options(concurrency=4))
    holder: list[sqlite3.Connection] = []

    def lock(_: Running) -> None:
        connection = sqlite3.connect(locked.state_dir / "tokenbroker.db", timeout=30,
                                     isolation_level=None)  # fmt: skip
        connection.execute("BEGIN EXCLUSIVE")
        holder.append(connection)

    def unlock(_: Running) -> None:
        for connection in holder:
            connection.execute("ROLLBACK")
            connection.close()

    outages.append(_inject(ctx, locked, "sqlite-locked", lock, unlock, seconds=seconds,
                           failure=False))  # fmt: skip
    _settle(result, outages)
    return [result]


def slow_stores(ctx: Context) -> list[ScenarioResult]:
    """Firestore, Secret Manager and Pub/Sub slow (every chunk delayed), not failed; at the
    full size each in turn, for longer than a lease."""
    result = ScenarioResult("slow_stores[gcp]", "gcp")
    deployment = ctx.gcp("slow-gcp", Options(concurrency=8))
    assert isinstance(deployment, GcpDeployment)
    proxies = {
        "firestore": deployment.fs_proxy,
        "secret-manager": deployment.sm_proxy,
        "pubsub": deployment.ps_proxy,
    }
    phases = [tuple(proxies)] if ctx.size.slow_seconds <= 0 else [(p,) for p in proxies]
    outages = []
    delay = ctx.size.slow_delay
    for phase in phases:
        name = "slow-" + ("all" if len(phase) > 1 else phase[0])

        def slow(_: Running, phase: tuple[str, ...] = phase) -> None:
            for part in phase:
                proxies[part].set_mode("delay", delay)

        def fast(_: Running, phase: tuple[str, ...] = phase) -> None:
            for part in phase:
                proxies[part].set_mode("pass")

        outages.append(_inject(ctx, deployment, name, slow, fast, count=ctx.size.slow_group,
                               seconds=max(ctx.size.slow_seconds, 3.0), failure=False))  # fmt: skip
    _settle(result, outages)
    result.check("no invalid_grant", result.invalid_grant == 0)
    return [result]


def overload(ctx: Context) -> list[ScenarioResult]:
    result = ScenarioResult("overload", "embedded")
    deployment = ctx.embedded("overload", Options(concurrency=32, http_timeout=2.0))
    ids = deployment.seed("busy", ctx.size.overload_connections)
    # In use: each serves an access token while its outcome is unknown. This first tick gets a
    # long timeout: on a loaded machine the provider can take more than the scenario's 2 s,
    # and a connection with no access token yet rightly presents again at once (nothing to
    # serve meanwhile: the last step is now), which is not what this scenario tries.
    deployment.tick(ids, TOKENBROKER_HTTP_TIMEOUT_SECONDS="60")
    serving = {cid for cid, s in deployment.stored(ids).items()
               if s.credential.access_token is not None}  # fmt: skip
    result.check("precondition: every connection serves an access token", serving == set(ids))
    deployment.proxy.capacity(2, backlog=5)
    deployment.proxy.latency(0.8)
    started = time.time()
    ticks = [deployment.tick(ids) for _ in range(ctx.size.overload_ticks)]
    deployment.proxy.clear()
    ledger = deployment.proxy.ledger
    summary = ledger.summary(ids, since=started)
    reused = sorted({e.lineage for e in ledger.select(ids, since=started) if e.reuse and e.lineage})
    if reused:  # what led to it, for the failure message
        result.notes["reused"] = {cid: ledger.story(cid, origin=started) for cid in reused[:3]}
        result.notes["ticks"] = [(t.returncode, t.summary, t.tail[-1500:]) for t in ticks]
    refused = sum(1 for e in deployment.proxy.ledger.select(ids, since=started)
                  if e.answer == "refused")  # fmt: skip
    deployment.figures(result, ids)  # the refusals are among the ledger's faults
    result.notes.update(refused=refused, undelivered_rotations=summary["undelivered_rotations"])
    result.check("no consumed token presented", result.reuse == 0)
    at_risk = deployment.at_risk(ids)
    result.check("the lost ones are at risk, still served",
                 all(v.cid in at_risk for v in result.lost))  # fmt: skip
    result.check("nothing lost but unknown outcomes",
                 result.connections_lost <= summary["undelivered_rotations"])  # fmt: skip
    return [result]


def clock_steps(ctx: Context) -> list[ScenarioResult]:
    results = []
    for offset in ctx.size.clock_offsets:
        label = f"{offset:+.0f}s"
        result = ScenarioResult(f"clock_steps[{label}]", "embedded")
        group = ctx.size.stale_group
        deployment = ctx.embedded(f"clock{int(offset):+d}".replace("+", "p").replace("-", "m"),
                                  Options(concurrency=group))  # fmt: skip
        ids = deployment.seed("clock", group)
        # The first refresher's requests all stay on the wire while the second one starts
        # and claims: whether it presents the same tokens is then decided by the leases
        # alone. The host behind claims first when the step is negative: its leases look
        # expired to the host on time.
        deployment.proxy.latency(12.0)
        ahead = offset > 0
        first = (
            deployment.cli("--json", "refresh", *ids, what="on-time")
            if ahead
            else deployment.launcher("--clock-offset", str(offset), *ids, what="stepped")
        )
        ledger = deployment.proxy.ledger
        wait_until(lambda ledger=ledger, ids=ids: len(ledger.select(ids)) >= len(ids), 60)
        second = (
            deployment.launcher("--clock-offset", str(offset), *ids, what="stepped")
            if ahead
            else deployment.cli("--json", "refresh", *ids, what="on-time")
        )
        first.wait(300)
        second.wait(300)
        deployment.proxy.latency(0.0)
        deployment.figures(result, ids)
        result.notes.update(first=first.last_json(), second=second.last_json())
        result.check("never the same token twice", result.reuse == 0)
        result.check("nothing lost", result.connections_lost == 0)
        results.append(result)
    return results


def serve_liveness(ctx: Context) -> list[ScenarioResult]:
    result = ScenarioResult("serve_liveness", "embedded")
    deployment = ctx.embedded("liveness", Options(concurrency=2))
    odd, control = deployment.seed("live", 2)
    deployment.proxy.script_for(odd, [fp.expires_in("1e15")] * 3)
    serve = deployment.cli("serve", "--port", str(free_port()), "--interval", "1",
                           what="serve")  # fmt: skip
    wait_until(lambda: bool(deployment.proxy.ledger.select([odd])), 60)
    time.sleep(2.0)
    deployment.force_due([control])
    kept_going = wait_until(
        lambda: rotations(deployment.proxy.ledger, [control]) >= 2 or serve.returncode is not None,
        8,
    )
    exited = serve.returncode
    serve.stop()
    deployment.figures(result, [odd, control])
    result.notes.update(control_refreshes=rotations(deployment.proxy.ledger, [control]),
                        exit_code=exited)  # fmt: skip
    result.check("keeps refreshing or exits non-zero",
                 kept_going and (exited is None or exited != 0))  # fmt: skip
    return [result]


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[[Context], list[ScenarioResult]]] = {
    # Longest waits first: they overlap with the busy ones.
    "kill_points[embedded]": lambda ctx: kill_points(ctx, "embedded"),
    "sigstop_past_lease": sigstop_past_lease,
    "answer_past_lease": answer_past_lease,
    "kill_points[gcp]": lambda ctx: kill_points(ctx, "gcp"),
    "random_kills[embedded]": lambda ctx: random_kills(ctx, "embedded"),
    "store_outages[embedded]": store_outages_embedded,
    "store_outages[gcp]": store_outages_gcp,
    "random_kills[gcp]": lambda ctx: random_kills(ctx, "gcp"),
    "slow_stores[gcp]": slow_stores,
    "provider_faults": provider_faults,
    "races[embedded]": lambda ctx: races(ctx, "embedded"),
    "races[gcp]": lambda ctx: races(ctx, "gcp"),
    "overload": overload,
    "clock_steps": clock_steps,
    "serve_liveness": serve_liveness,
}


@dataclass
class SuiteResult:
    size: str
    results: list[ScenarioResult]
    skipped: dict[str, str]
    leaks: list[str]
    seconds: float

    def by_name(self) -> dict[str, ScenarioResult]:
        return {r.name: r for r in self.results}

    def figures(self) -> dict[str, Any]:
        figures = summarize(self.results)
        figures.update(size=self.size, skipped=self.skipped, leaks=len(self.leaks),
                       seconds=round(self.seconds, 1))  # fmt: skip
        return figures


def _run_one(name: str, ctx: Context) -> tuple[list[ScenarioResult], str | None]:
    started = time.time()
    log(f"{name}: start")
    try:
        results = SCENARIOS[name](ctx)
    except Skipped as skipped:
        log(f"{name}: skipped: {skipped}")
        return [], str(skipped)
    except Exception:  # noqa: BLE001 - one scenario's failure must not hide the others'
        error = traceback.format_exc()
        log(f"{name}: harness error\n{error}")
        results = [ScenarioResult(name, "?", error=error[-4000:])]
    for result in results:
        result.seconds = time.time() - started
    log(f"{name}: done in {time.time() - started:.0f}s")
    return results, None


def run_suite(size: Size, *, only: Sequence[str] | None = None) -> SuiteResult:
    """Run the scenarios (all, or ``only``) at ``size``; always cleans up after itself."""
    chosen = [
        n
        for n in SCENARIOS
        if (n in (only or ()) or n.split("[")[0] in (only or ()))
        or (not only and n not in size.skip)
    ]
    started = time.time()
    with workspace() as workdir:
        provider = Provider(workdir)
        ctx = Context(provider, workdir, size, gcp_skip_reason())
        results: list[ScenarioResult] = []
        skipped: dict[str, str] = {}
        try:
            with ThreadPoolExecutor(size.workers) as pool:
                futures = {n: pool.submit(_run_one, n, ctx) for n in chosen}
                for name, future in futures.items():
                    found, reason = future.result()
                    results.extend(found)
                    if reason is not None:
                        skipped[name] = reason
            outputs = [p for p in workdir.rglob("*") if p.suffix in {".stdout", ".stderr"}]
            # Under pytest, this process's own log lines (the in-process ticks) too.
            capture = os.environ.get(CAPTURE_ENV)
            if capture:
                outputs += [p for p in Path(capture).rglob("*") if p.is_file()]
            leaks = leaked(provider.issued(), outputs)
        finally:
            for deployment in ctx.deployments:
                deployment.close()
            provider.close()
    return SuiteResult(size.name, results, skipped, leaks, time.time() - started)


__all__ = ["FULL", "PROVIDER_FAULTS", "QUICK", "SCENARIOS", "Size", "SuiteResult", "run_suite"]
