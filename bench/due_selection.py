"""Due selection on Firestore: what one ``claim_due`` reads when few of many connections are due.

The Firestore state store selects due connections with an indexed query on
``next_refresh_at`` (see ``tokenbroker.adapters.gcp.firestore``), so a tick should read about
as many documents as are due, however many are registered. This measures it on the official
Firestore emulator:

1. starts the emulator (``tests/support/emulators.py``; exits 2 with the reason when it is not
   installed) and picks a fresh project, so nothing else is in the collection;
2. **seeds** ``--registered`` connections (default 100,000), ``--due-fraction`` of them
   (default 1 %) due, spread over the id space, the rest due in one to five hours. Seeding
   writes the adapter's own document layout (``stored_document``) with batched writes of 500
   from 8 threads (the emulator takes ~4-5k documents/s that way; ``BulkWriter`` ramps up
   under the 500/50/5 rule and was ~10x slower here). Timed separately: ``seed_seconds``;
3. **claims**: one ``claim_due(now, holder, ttl, limit=registered)`` through a fresh
   ``FirestoreStateStore`` handle whose client is already connected (a warm-up ``get`` runs
   first; its read is not counted). Timed: ``seconds``;
4. **counts reads** twice: the adapter's own counter (``documents_read``: every document
   snapshot it read) and, independently, every snapshot the client library handed back from
   queries and batch gets (its ``Query.stream`` and ``Client.get_all`` are wrapped for the
   run). The two must agree. ``count()`` aggregations are reported apart
   (``aggregations``): Firestore bills them per 1,000 index entries, not per document;
5. checks, untimed: exactly the due connections were claimed, each once, earliest first;
   documents read <= 2 x due (the requirement). Exits 1 if a check fails;
6. then completes every lease (``complete_seconds``, ``complete_documents_read``), as a
   refresher would at the end of its tick.

The emulator is not Firestore: it bills nothing, and it has no indexes -- every query scans
the whole collection (a query matching nothing takes ~1 s at 100,000 documents, reported as
``empty_query_seconds``), so ``seconds`` here grows with the registry where Firestore's would
not. The document counts are what Firestore would bill for documents; the timings are only
indicative.

The last line on stdout is one JSON object: ``registered``, ``due``, ``documents_read``,
``seconds``, ``seed_seconds``, ``claimed`` plus details.

Usage: ``.venv/bin/python bench/due_selection.py [--registered 100000] [--due-fraction 0.01]
[--chunk-size 250] [--json-only]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "shared"))

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)
BATCH = 500  # documents per batched write
SEED_THREADS = 8


def log(message: str, *, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def start_emulator() -> str:
    import pytest
    from tests.support.emulators import emulator

    try:
        return emulator("firestore").host
    except pytest.skip.Exception as skipped:
        print(f"skipped: {skipped}", file=sys.stderr)
        raise SystemExit(2) from None


def plan(registered: int, due_fraction: float) -> tuple[list[str], set[str]]:
    """Connection ids, and which of them are due: every k-th id, so they are spread out."""
    ids = [f"c{n:07d}" for n in range(registered)]
    due_count = round(registered * due_fraction)
    step = registered / due_count if due_count else 0
    due = {ids[int(n * step)] for n in range(due_count)}
    return ids, due


def seed(client: Any, collection: str, ids: list[str], due: set[str]) -> float:
    from tokenbroker.adapters.gcp.firestore import stored_document
    from tokenbroker.kernel.model import Connection, ConnectionStatus, GrantType, RefreshState

    rnd = random.Random(7)
    created = datetime(2026, 1, 1, tzinfo=UTC)

    def document(cid: str) -> dict[str, Any]:
        if cid in due:  # overdue by 0-10 minutes, distinct instants
            at = NOW - timedelta(seconds=rnd.uniform(0, 600))
        else:
            at = NOW + timedelta(hours=rnd.uniform(1, 5))
        state = RefreshState(
            status=ConnectionStatus.ACTIVE,
            expires_at=at + timedelta(minutes=5),
            next_refresh_at=at,
            current_version=1,
        )
        conn = Connection(
            id=cid,
            profile="generic",
            grant=GrantType.REFRESH_TOKEN,
            client_id=f"client-{cid}",
            scopes=("openid", "offline_access"),
            token_url="https://idp.example/token",  # noqa: S106 - a URL, not a password
            created_at=created,
        )
        return stored_document(conn, state)

    documents = [(cid, document(cid)) for cid in ids]  # built before the clock starts
    ref = client.collection(collection)

    def write(start: int) -> None:
        batch = client.batch()
        for cid, body in documents[start : start + BATCH]:
            batch.set(ref.document(cid), body)
        batch.commit()

    started = time.perf_counter()
    with ThreadPoolExecutor(SEED_THREADS) as pool:
        list(pool.map(write, range(0, len(documents), BATCH)))
    return time.perf_counter() - started


class SnapshotTally:
    """Counts, at the client library's boundary, the document snapshots handed back."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def wrap(self, stream: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        tally = self

        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            for snapshot in stream(*args, **kwargs):
                with tally._lock:
                    tally.count += 1
                yield snapshot

        return counted


@contextmanager
def library_tally() -> Iterator[SnapshotTally]:
    from google.cloud.firestore_v1.client import Client
    from google.cloud.firestore_v1.query import Query

    tally = SnapshotTally()
    originals = (Query.stream, Client.get_all)
    Query.stream = tally.wrap(Query.stream)  # type: ignore[method-assign]
    Client.get_all = tally.wrap(Client.get_all)  # type: ignore[method-assign]
    try:
        yield tally
    finally:
        Query.stream, Client.get_all = originals  # type: ignore[method-assign]


def measure(project: str, chunk_size: int, registered: int, due: set[str]) -> dict[str, Any]:
    """Steps 3-6: one claim_due over the seeded collection, counted, checked, completed."""
    from tokenbroker.adapters.gcp.firestore import FirestoreStateStore
    from tokenbroker.kernel.errors import NotFound
    from tokenbroker.kernel.model import RefreshState

    store = FirestoreStateStore(project=project, chunk_size=chunk_size)
    with contextlib.suppress(NotFound):
        store.get("warm-up")  # connects the client; not part of the measurement
    store.documents_read = store.aggregations_run = store.transactions_run = 0

    with library_tally() as tally:
        started = time.perf_counter()
        batch = store.claim_due(NOW, holder="bench", ttl=TTL, limit=registered)
        seconds = time.perf_counter() - started
    documents_read = store.documents_read
    aggregations, transactions = store.aggregations_run, store.transactions_run

    # The emulator has no indexes: it scans the collection for every query, so its query time
    # grows with the registry even when nothing matches (Firestore's does not). One query
    # that matches nothing, timed, shows that share of ``seconds``.
    started = time.perf_counter()
    nothing = list(store.queries(NOW - timedelta(days=365))[0].limit(1).stream())
    empty_query_seconds = time.perf_counter() - started

    claimed = [c.lease.connection_id for c in batch.claims]
    order = [(c.record.state.next_refresh_at, c.lease.connection_id) for c in batch.claims]
    checks = {
        "claimed_exactly_the_due_set": sorted(claimed) == sorted(due),
        "each_claimed_once": len(claimed) == len(set(claimed)),
        "earliest_first": order == sorted(order),
        "reads_at_most_twice_due": documents_read <= 2 * len(due),
        "counter_matches_library": documents_read == tally.count,
        "probe_matched_nothing": nothing == [],
    }

    before = store.documents_read
    started = time.perf_counter()
    written = RefreshState(next_refresh_at=NOW + timedelta(hours=1), current_version=2)
    checks["every_completion_accepted"] = all(
        store.complete([(c.lease, written) for c in batch.claims])
    )
    complete_seconds = time.perf_counter() - started
    store.close()
    return {
        "documents_read": documents_read,
        "seconds": round(seconds, 3),
        "claimed": len(claimed),
        "library_snapshots": tally.count,
        "aggregations": aggregations,
        "reads_per_due": round(documents_read / len(due), 3) if due else None,
        "chunk_size": chunk_size,
        "transactions": transactions,
        "leased_elsewhere": batch.leased_elsewhere,
        "empty_query_seconds": round(empty_query_seconds, 3),
        "complete_seconds": round(complete_seconds, 3),
        "complete_documents_read": store.documents_read - before,
        "checks": checks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registered", type=int, default=100_000)
    parser.add_argument("--due-fraction", type=float, default=0.01)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()
    quiet = args.json_only

    host = start_emulator()
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    from tokenbroker.adapters.gcp.firestore import DEFAULT_CHUNK_SIZE, DEFAULT_COLLECTION

    project = f"tb-bench-{uuid.uuid4().hex[:12]}"
    ids, due = plan(args.registered, args.due_fraction)
    log(f"emulator {host}, project {project}", quiet=quiet)

    seeder = firestore.Client(project=project, credentials=AnonymousCredentials())
    log(f"seeding {len(ids)} connections ({len(due)} due) ...", quiet=quiet)
    seed_seconds = seed(seeder, DEFAULT_COLLECTION, ids, due)
    seeder.close()
    log(f"seeded in {seed_seconds:.1f} s ({len(ids) / seed_seconds:,.0f}/s)", quiet=quiet)

    measured = measure(project, args.chunk_size or DEFAULT_CHUNK_SIZE, args.registered, due)
    result = {
        "registered": args.registered,
        "due": len(due),
        "documents_read": measured.pop("documents_read"),
        "seconds": measured.pop("seconds"),
        "seed_seconds": round(seed_seconds, 2),
        "claimed": measured.pop("claimed"),
        **measured,
        "seed_per_second": round(len(ids) / seed_seconds),
        "emulator": True,
        "python": platform.python_version(),
    }
    failed = [name for name, ok in result["checks"].items() if not ok]
    if failed:
        result["failed"] = failed
    print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
