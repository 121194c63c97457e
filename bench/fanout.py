"""Fan-out: 1, 2 and 4 worker processes share one due set on the emulators, each refreshed once.

What it does (docs/gcp.md, "Fan-out"):

1. starts what ``bench/refresh_throughput.py --backend gcp`` starts, with its own functions
   (imported, not copied): the Firestore and Pub/Sub emulators, the Secret Manager test server
   and the strict rotating token endpoint (``bench/token_endpoint_server.py``), each in its own
   process; one project, its events topic, and N connections seeded due (default 20,000);
2. for each k in ``--workers`` (default 1 2 4): makes every connection due again (the
   documented ``next_refresh_at`` field; the shared Secret Manager budget document is cleared
   so that earlier runs' takes do not pace this one), starts k worker processes and waits until
   each has built its runtime (a warm instance: the cold start is ``bench/cold_start.py``'s
   subject), then fans out exactly as the scheduled tick does --
   :func:`tokenbroker.refresh.fanout.fan_out` publishes k shard messages to a fan-out topic on
   the Pub/Sub emulator -- pulls them from a subscription and hands one to each worker, which
   runs it through the refresher's entry point (``refresher.run_tick(payload)``: the tick the
   worker function runs, with ``TOKENBROKER_TICK_LIMIT`` = N: a worker claims only its shard's
   connections, so its shard, not the limit, bounds its share). The timer runs from
   handing out the messages until the last worker's tick returned;
3. checks, untimed: the workers' claims add up to N and none failed; the provider saw exactly N
   more refreshes and no ``invalid_grant`` (a connection refreshed twice would present a
   consumed refresh token: the provider revokes the grant and counts it); every connection
   reads back at secret version ``round + 1`` holding the provider's newest token -- a version
   per refresh, so each connection was refreshed exactly once. Exits 1 if a check fails.

Reported per k: seconds, refreshes a second, the speed-up over k = 1, the workers' CPU seconds
(each worker's own process time over its tick) and the backends' (emulators, Secret Manager
test server, provider), refreshes per CPU second of the workers and of everything, and the
contention: each worker's wall time in the Firestore state store's calls (``claim_due``,
``renew``, ``complete``, ...), its transactions and how many of their attempts were ABORTED
retries (lock contention; an uncontended claim takes ceil(limit / 250) transactions).
On a 2-core machine, k > 2 cannot run faster in wall time: the CPU-normalised rates say whether
fan-out itself costs anything. The last stdout line is one JSON object.

Usage: ``.venv/bin/python bench/fanout.py [--n 20000] [--workers 1 2 4] [--latency-ms 50]
[--json-only]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import selectors
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (str(REPO), str(HERE)):
    if path not in sys.path:
        sys.path.insert(0, path)

from refresh_throughput import (  # noqa: E402 - after the path set-up above
    GCP_TOPIC,
    LOG_LEVEL,
    connection_id,
    endpoints,
    force_due,
    gcp_deployment,
    group_cpu_seconds,
    log,
    provider_process,
    pull_events,
    refresh_token_for,
    secret_manager_process,
    seed_batch,
    start_emulators,
)
from tokenbroker.entrypoints.compose import start_logging  # noqa: E402
from tokenbroker.refresh.fanout import FanOut, fan_out  # noqa: E402

DEFAULT_N = 20_000
FANOUT_TOPIC = "tokenbroker-fanout"
#: Firestore claims this many documents per transaction (FirestoreStateStore's default).
CLAIM_CHUNK = 250


# -- a worker: one process, one shard message, one tick through the entry point --------------


def worker_main() -> int:
    """Build the instance's runtime, say READY, read one shard payload from stdin, run it
    through the refresher's entry point, print one JSON line of what it cost."""
    from tokenbroker.entrypoints import refresher

    runtime = refresher.runtime()
    state: Any = runtime.state
    # The test server has no quota, and the shared budget caps a project at MAX_BUDGET_LIMIT
    # (10,000) refreshes a window: fan-out's scaling is measured here, the pacing is
    # bench/quota_pacing.py's subject (the JSON says "budget": "off").
    runtime.secrets.request_quota = lambda: None  # type: ignore[method-assign]
    ports = PortTimer(state)
    state.parked_events(1)  # the Firestore client's channel, opened as a warm instance has it
    print("READY", flush=True)
    payload = json.loads(sys.stdin.readline())
    ports.reset()
    cpu, wall = time.process_time(), time.perf_counter()
    result: dict[str, Any] = {"shard": payload.get("shard")}
    try:
        result["summary"] = refresher.run_tick(payload, trigger="cloudevent")
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the run
        result["error"] = f"{type(error).__name__}: {error}"
    result.update(
        seconds=time.perf_counter() - wall,
        cpu_seconds=time.process_time() - cpu,
        **ports.report(),
    )
    print(json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


class PortTimer:
    """Wall time of the Firestore state store's calls during the tick, and its transactions:
    ``_transact`` runs one read-write transaction per call, again after each ABORTED (lock
    contention, see FirestoreStateStore._transact), so attempts - calls = contention retries."""

    METHODS = ("claim_due", "renew", "complete", "release", "take_budget")

    def __init__(self, state: Any) -> None:
        self.state = state
        self.wall: dict[str, float] = {}
        self.calls = 0
        self.attempts_at = state.transactions_run
        for name in self.METHODS:
            setattr(state, name, self._timed(name, getattr(state, name)))
        transact = state._transact

        def counted(body: Any) -> Any:
            self.calls += 1
            return transact(body)

        state._transact = counted

    def _timed(self, name: str, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - started

        return timed

    def reset(self) -> None:
        self.wall.clear()
        self.calls = 0
        self.attempts_at = self.state.transactions_run

    def report(self) -> dict[str, Any]:
        attempts = self.state.transactions_run - self.attempts_at
        return {
            "port_seconds": {name: round(v, 3) for name, v in sorted(self.wall.items())},
            "transactions": self.calls,
            "transaction_retries": attempts - self.calls,
        }


def worker_env(project: str, reach: dict[str, str], limit: int, concurrency: int) -> dict[str, str]:
    """A worker function's environment, as Terraform sets it (without fan-out: it is a worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENBROKER_")}
    quota = "100000"  # the test server has no quota: the fan-out is measured, not the pacing
    env.update(
        TOKENBROKER_BACKEND="gcp",
        TOKENBROKER_GCP_PROJECT=project,
        TOKENBROKER_SECRET_MANAGER_ENDPOINT=reach["secret_manager"],
        FIRESTORE_EMULATOR_HOST=reach["firestore"],
        PUBSUB_EMULATOR_HOST=reach["pubsub"],
        TOKENBROKER_PUBSUB_TOPIC=GCP_TOPIC,
        TOKENBROKER_TICK_LIMIT=str(limit),
        TOKENBROKER_CONCURRENCY=str(concurrency),
        TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE=quota,
        TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE=quota,
        TOKENBROKER_METRICS="off",
        TOKENBROKER_LOG_LEVEL=LOG_LEVEL,
        PYTHONPATH=os.pathsep.join([str(REPO / "shared"), env.get("PYTHONPATH", "")]),
    )
    return env


@contextlib.contextmanager
def workers(k: int, env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
        )
        for _ in range(k)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None  # noqa: S101
            line = proc.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"a worker failed to start: {line!r}")
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


# -- the parent ---------------------------------------------------------------------------------


def shard_messages(project: str, k: int, subscriber: Any, subscription: str) -> list[bytes]:
    """Fan out as the scheduled tick does, then read the k messages back off the topic."""
    from tokenbroker.entrypoints.refresher import PubSubShardPublisher

    publisher = PubSubShardPublisher()
    try:
        fan_out(FanOut(k, f"projects/{project}/topics/{FANOUT_TOPIC}"), publisher)
    finally:
        publisher.close()
    messages: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(messages) < k and time.monotonic() < deadline:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": k}, timeout=10
        )
        if response.received_messages:
            messages.extend(m.message.data for m in response.received_messages)
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
    if len(messages) != k:
        raise RuntimeError(f"fan-out: {len(messages)} of {k} shard messages arrived")
    return messages


#: The tick summary's fields reported per worker.
SUMMARY_KEYS = ("claimed", "refreshed", "lease_lost", "deferred", "quota_deferred", "seconds")


def collect(procs: list[subprocess.Popen[str]], deadline: float) -> list[dict[str, Any]]:
    """Each worker's JSON line; a worker that has not answered by ``deadline`` is killed and
    reported as timed out (the provider's counters still say how far the run got)."""
    results: dict[int, dict[str, Any]] = {}
    with selectors.DefaultSelector() as selector:
        for index, proc in enumerate(procs):
            assert proc.stdout is not None  # noqa: S101
            selector.register(proc.stdout, selectors.EVENT_READ, index)
        while len(results) < len(procs):
            ready = selector.select(timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:
                break
            for key, _ in ready:
                line = key.fileobj.readline()  # type: ignore[union-attr]
                results[key.data] = json.loads(line) if line.strip() else {"error": "exited"}
                selector.unregister(key.fileobj)
    for index, proc in enumerate(procs):
        if index not in results:
            proc.kill()
            results[index] = {"error": "timed out"}
    empty = {"seconds": 0.0, "cpu_seconds": 0.0, "port_seconds": {}, "transactions": 0,
             "transaction_retries": 0}  # fmt: skip
    return [{**empty, **results[i]} for i in range(len(procs))]


def versions_moved(runtime: Any, ids: list[str], before: dict[str, int]) -> dict[str, int]:
    """Per connection, how far its secret version moved in the run (one version a refresh),
    and whether it holds the provider's newest refresh token for that version."""
    after = runtime.secrets.get_many(ids)
    moved: Counter[str] = Counter()
    for index, cid in enumerate(ids):
        item = after.get(cid)
        step = (item.version - before.get(cid, 0)) if item is not None else 0
        moved["refreshed_once" if step == 1 else "not_refreshed" if step == 0 else
              "refreshed_more"] += 1  # fmt: skip
        token = item.credential.refresh_token if item is not None else None
        if token is None or token.reveal() != refresh_token_for("lib", index, item.version - 1):  # type: ignore[union-attr]
            moved["wrong_token"] += 1
    return {key: moved[key] for key in ("refreshed_once", "not_refreshed", "refreshed_more",
                                        "wrong_token")}  # fmt: skip


def backend_cpu(deployment: Any, provider: Any) -> dict[str, float]:
    cpu = {
        "secret_manager": float(deployment.secret_manager.stats()["cpu_seconds"]),
        "provider": float(provider.stats()["cpu_seconds"]),
    }
    for name, running in deployment.emulators.items():
        used = group_cpu_seconds(running.proc.pid)
        if used is not None:
            cpu[f"{name}_emulator"] = used
    return cpu


def clear_budget(deployment: Any) -> None:
    """Forget the shared Secret Manager budget's takes (a new window, as a minute later)."""
    state: Any = deployment.runtime.state
    key = deployment.runtime.secrets.request_quota().key
    state._budget(f"{key}:refreshes").delete()


def one_run(  # noqa: PLR0917 - one bench step, its parts passed as they are
    k: int,
    args: argparse.Namespace,
    deployment: Any,
    provider: Any,
    reach: dict[str, str],
    fanout_subscription: str,
) -> tuple[dict[str, Any], list[str]]:
    n = args.n
    limit = n  # the shard bounds a worker's share (about n / k, by the hash of the id)
    env = worker_env(deployment.project, reach, limit, args.concurrency)
    counters = provider.stats()["counters"]
    ids = [connection_id(i) for i in range(n)]
    before = {cid: item.version for cid, item in deployment.runtime.secrets.get_many(ids).items()}
    with workers(k, env) as procs:
        messages = shard_messages(deployment.project, k, deployment.subscriber, fanout_subscription)
        cpu_before = backend_cpu(deployment, provider)
        started = time.perf_counter()
        for proc, data in zip(procs, messages, strict=True):
            assert proc.stdin is not None  # noqa: S101
            proc.stdin.write(data.decode() + "\n")
            proc.stdin.flush()
        results = collect(procs, started + args.run_timeout)
        seconds = time.perf_counter() - started
        cpu_after = backend_cpu(deployment, provider)
    after = provider.stats()["counters"]

    problems: list[str] = []
    refreshed = after.get("refreshed:lib", 0) - counters.get("refreshed:lib", 0)
    invalid = after.get("invalid_grant:lib", 0) - counters.get("invalid_grant:lib", 0)
    summaries = [r.get("summary") or {} for r in results]
    claimed = sum(s.get("claimed", 0) for s in summaries)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        problems.append(f"k={k}: workers failed: {errors}")
    if refreshed != n or invalid:
        problems.append(f"k={k}: provider refreshed {refreshed} of {n}, {invalid} invalid_grant")
    if claimed != n or sum(s.get("refreshed", 0) for s in summaries) != n:
        problems.append(f"k={k}: workers claimed {claimed} (lease_lost, deferred: see summaries)")
    once = versions_moved(deployment.runtime, ids, before)
    if once["refreshed_once"] != n:
        problems.append(f"k={k}: secret versions: {once}")
    pull_events(deployment, refreshed, timeout=60)  # drained: the next run starts empty

    worker_cpu = sum(r["cpu_seconds"] for r in results)
    backends = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    total_cpu = worker_cpu + sum(backends.values())
    uncontended = math.ceil(n / k / CLAIM_CHUNK)
    figures = {
        "workers": k,
        "limit_per_worker": limit,
        "seconds": round(seconds, 3),
        "per_second": round(refreshed / seconds, 1),
        "provider_refreshed": refreshed,
        "provider_invalid_grants": invalid,
        "claimed_per_worker": [s.get("claimed", 0) for s in summaries],
        "worker_seconds": [round(r["seconds"], 3) for r in results],
        "worker_cpu_seconds": round(worker_cpu, 2),
        "backend_cpu_seconds": {name: round(v, 2) for name, v in backends.items()},
        "total_cpu_seconds": round(total_cpu, 2),
        "per_worker_cpu_second": round(refreshed / worker_cpu, 1) if worker_cpu else None,
        "per_cpu_second": round(refreshed / total_cpu, 1) if total_cpu else None,
        "worker_cpu_ms_per_refresh": round(worker_cpu / max(refreshed, 1) * 1000, 3),
        "claim_seconds_per_worker": [r["port_seconds"].get("claim_due", 0.0) for r in results],
        "port_seconds_per_worker": [r["port_seconds"] for r in results],
        "transactions_per_worker": [r["transactions"] for r in results],
        "transaction_retries_per_worker": [r["transaction_retries"] for r in results],
        "claim_transactions_uncontended": uncontended,
        "secret_versions": once,
        "summaries": [{key: v for key, v in s.items() if key in SUMMARY_KEYS} for s in summaries],
        "timed_out": any(r.get("error") == "timed out" for r in results),
        "exactly_once": once["refreshed_more"] == 0 and invalid == 0,
        "all_refreshed": not problems,
    }
    return figures, problems


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="due connections")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="k values")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="provider latency")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight each")
    parser.add_argument(
        "--run-timeout", type=float, default=600.0, help="seconds a k run may take (then killed)"
    )
    parser.add_argument("--json-only", action="store_true", help="print only the JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.n < 1 or min(args.workers) < 1:
        parser.error("--n and every --workers value must be at least 1")
    # gcp_deployment and the seeding read these, as refresh_throughput's arguments.
    args.rpc_latency_ms = 0.0
    return args


def run(args: argparse.Namespace) -> int:
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]

    start_logging(level=LOG_LEVEL)
    emulators = start_emulators()
    runs: list[dict[str, Any]] = []
    problems: list[str] = []
    try:
        with (
            secret_manager_process() as secret_manager,
            provider_process(args.latency_ms) as provider,
            endpoints(secret_manager, emulators, 0.0) as reach,
            gcp_deployment(secret_manager, emulators, args, reach) as deployment,
        ):
            started = time.perf_counter()
            seed_batch(deployment.runtime, provider.token_url, args.n)
            setup_seconds = time.perf_counter() - started
            log(f"setup: {args.n} connections in {setup_seconds:.1f} s", args.json_only)
            publisher = pubsub_v1.PublisherClient()
            topic = publisher.topic_path(deployment.project, FANOUT_TOPIC)
            publisher.create_topic(name=topic)
            subscription = deployment.subscriber.subscription_path(
                deployment.project, f"fanout-{uuid.uuid4().hex[:8]}"
            )
            deployment.subscriber.create_subscription(
                request={"name": subscription, "topic": topic}
            )
            for round_no, k in enumerate(args.workers, start=1):
                if round_no > 1:
                    force_due(deployment.runtime, args.n)
                clear_budget(deployment)
                figures, found = one_run(k, args, deployment, provider, reach, subscription)
                runs.append(figures)
                problems += found
                log(
                    f"k={k}: {figures['per_second']:,.0f}/s ({figures['seconds']:.1f} s), "
                    f"{figures['per_worker_cpu_second'] or 0:,.0f} per worker CPU s, "
                    f"versions {figures['secret_versions']}, "
                    f"ABORTED retries {figures['transaction_retries_per_worker']}, "
                    f"claim s {figures['claim_seconds_per_worker']}",
                    args.json_only,
                )
    finally:
        for running in emulators.values():
            running.stop()
    base = runs[0]["per_second"] if runs else None
    for figures in runs:
        figures["speedup"] = round(figures["per_second"] / base, 2) if base else None
    result = {
        "n": args.n,
        "runs": runs,
        "setup_seconds": round(setup_seconds, 1),
        "latency_ms": args.latency_ms,
        "concurrency_per_worker": args.concurrency,
        "cpus": os.cpu_count(),
        "log_level": LOG_LEVEL,
        "budget": "off (the test server has no quota; a project's shared budget would cap the "
        "tick at 10,000 refreshes a minute)",
        "ok": not problems,
    }
    if problems:
        result["problems"] = problems
    for problem in problems:
        log(f"CHECK FAILED: {problem}", quiet=False)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    if argv is None and "--worker" in sys.argv[1:]:
        return worker_main()
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
