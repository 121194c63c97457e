"""The StateStore port on Cloud Firestore (Native mode), with the official client library.

Document layout
---------------
One document per connection in ``<collection>`` (default ``tokenbroker_connections``), its id
the connection id (connection ids fit Firestore document ids, see ``model.CONNECTION_ID_RE``)::

    connection            map        Connection.to_json(): what to refresh and how, no secret
    slot, bucket          int        model.slot_of(id), a hash of the id, and its bucket
                                     (model.bucket_of): where a sharded claim finds it
                                     (``prepare_shards`` writes them on older records)
    status                string     "active" | "needs_reauth" | "disabled"
    expires_at, next_refresh_at, last_refresh_at, last_attempt_at
                          timestamp  (or null) Firestore timestamps, so they can be indexed
    consecutive_failures  int
    current_version       int or null
    last_error            string or null
    lease_holder          string     who holds the lease; null when none is held
    lease_token           int        the newest fencing token granted on this connection
    lease_expires_at      timestamp  when the lease ends; 1970-01-01 when none is held (not
                                     null: a null would fall out of the range filter below)

and one tombstone per deleted connection in ``<collection>_fencing`` holding the retired
``lease_token``: a connection re-created under the same id continues the token sequence, so a
refresher that leased the old one can never commit on the new one.

The outbox is ``<collection>_parked_events``, one document per event (named by a hash of its
id; ``seq``, the time it was parked, gives the oldest-first order -- see ``_OutboxOrder``):
``complete`` writes the events of the outcomes it accepts there in the same transaction as the
state, and the refresher relays and deletes them; events the bus could not take stay there for
the next tick. No document is shared by every commit, so commits on disjoint connections
never contend.

Token-endpoint budgets (``take_budget``) live in ``<collection>_budgets``, one document per
budget key, named by the SHA-256 of the key (any key makes a valid document name)::

    key         string     the budget key, checked on read
    takes       array      {at: int, cost: int} per take still in the window, oldest first
                           (``at`` in microseconds since the epoch: exact window boundaries)
    expires_at  timestamp  when the last take has aged out, plus ``budget_log.GC_GRACE``

A take is one transaction on that one document: read it, decide (:mod:`..budget_log`), and
on a grant write it back; a denial writes nothing. Serializable isolation makes racing takers
on any number of instances see each other's takes, so a budget is never over-spent. Documents
of keys nobody takes from any more (refresh tokens rotated away) are deleted by a TTL policy on
``expires_at`` (https://cloud.google.com/firestore/docs/ttl; see ``terraform/README.md``).

Scaling: the takes of one key serialise on its document. Firestore names "a document
receiving too many updates per second" and overlapping transactions as the causes of ABORTED
and advises reducing the write rate to individual documents
(https://cloud.google.com/firestore/docs/understand-error-codes); here ABORTED is retried with
jittered backoff (``_transact``), then becomes ``StoreUnavailable``. A per-refresh-token
budget has one taker at a time (the connection's lease holder), so it never contends. A
budget shared by many connections (per client, per endpoint) is bounded by one document's
update rate -- a handful of takes per second; on the emulator, which settles each lock
conflict by a ~2 s timeout, four racing takers on one key manage about one take per second.
To go beyond that, take ``cost=k`` once for a batch of ``k`` refreshes, or split the limit
over several keys (exact, at the price of fragmenting it).

Selecting due connections
-------------------------
``claim_due`` is one query, run inside a transaction::

    status == "active" AND next_refresh_at <= now AND lease_expires_at <= now
    ORDER BY next_refresh_at LIMIT k

served by the composite index ``(status, next_refresh_at, lease_expires_at)``
(``google_firestore_index.due`` in ``terraform/modules/tokenbroker/firestore.tf``): it reads
only the due connections whose lease is free or expired (the crash-recovery point), so the
documents a tick reads grow with the number of due connections, never with the number
registered. Range filters on two fields are supported since
2024 (https://firebase.google.com/docs/firestore/query-data/multiple-range-fields); the results
come ordered by the inequality fields and then ``__name__``
(https://cloud.google.com/firestore/docs/reference/rest/v1/StructuredQuery, ``orderBy``). The
reference adapters order by ``(next_refresh_at, id)``: each chunk reads one document more than
it takes, and when that one is due at the same instant as the last one taken, every connection
due at that instant is read too (an equality query on the same index) before choosing on
``(next_refresh_at, id)``. So the same connections are taken, in the same order, as by the
in-memory and SQLite adapters.

``leased_elsewhere`` (due connections skipped for a live lease) is a ``count()`` aggregation of
``next_refresh_at <= now AND lease_expires_at > now`` on the same index, billed one read per
1,000 index entries (https://cloud.google.com/firestore/pricing), not per document. It runs
just before the claim, outside its transaction: inside, it would lock every due entry.

A sharded claim (fan-out workers, ``shard=``) adds ``bucket IN [the shard's buckets] AND
slot >= first AND slot <= last`` to both queries, served by
``(status, bucket, next_refresh_at, lease_expires_at, slot)``
(``google_firestore_index.due_in_shard``). The ``IN`` is a disjunction: Firestore scans one
index range per bucket (equality on ``status`` and ``bucket``) and merges them in
``next_refresh_at`` order, so the shard is still taken earliest first, and shards' claims read
-- and lock -- disjoint index entries: up to ``model.BUCKETS`` (32) shards own whole buckets and
never touch each other's; beyond, neighbouring shards may share one bucket (the slot range
splits it). A range filter on ``slot`` alone would not do: the scan over ``next_refresh_at``
would step over every shard's entries and lock them (``bench/fanout.py`` measured the
contention). At most 16 buckets per shard (two shards), under Firestore's 30 disjunctions.
Records written before the fields existed match no sharded query until ``prepare_shards``
writes them, which the fan-out's scheduled call does before publishing.

Lease time
----------
Leases run on Firestore's clock, never a refresher's (:class:`ServerClock`): a document read
returns the server's ``read_time``; from then on this process's monotonic clock measures the
time since, re-anchored every few minutes. Expiries written and compared are server time, so
refreshers on hosts whose clocks disagree, or whose clock is stepped, agree on who holds what.
(The anchor lags the server by at most one round trip; the holder's guard absorbs it.)

Claiming writes only the lease fields, so ``get`` still returns the record as last written
(the contract says a claim does not change the record, which rules out hiding a leased
connection by moving its ``next_refresh_at`` to the lease expiry); ``complete`` writes the new
state and gives the lease back. The due-but-leased connections are skipped inside the index
scan, as index entries: they are not documents read.

The emulator accepts queries without composite indexes (and scans the whole collection for
each), so a test checks that the Terraform's ``google_firestore_index`` resources hold an
index for every query this adapter builds (``queries``); without it, Firestore answers
FAILED_PRECONDITION.

Transactions
------------
Every read-modify-write runs in a Firestore transaction: reads first, then writes; the body may
run again when another transaction touched what it read (ABORTED), so every write is derived
from the body's own reads (https://cloud.google.com/firestore/docs/manage-data/transactions;
https://cloud.google.com/firestore/docs/transaction-data-contention). Serializable isolation is
what makes two claimers racing over the same due set never get the same connection, and what
makes ``complete`` check the fencing token and write the state atomically.

Claims and completions of many connections run in chunks of ``chunk_size`` (default 250)
documents per transaction, under the per-commit write limit, so 10,000 due connections take 40
transactions, not 10,000. Each chunk is atomic; a call spanning several chunks is a sequence of
atomic claims (the reference adapters take the whole set at once).

API calls (``k`` = documents in the call)
------------------------------------------
==============  ====================================================  ========================
operation       document reads                                        document writes
==============  ====================================================  ========================
create          2 (connection + tombstone, one batch get)             1
get             1                                                     0
list            all connections                                       0
delete          1                                                     2 (document + tombstone)
put_state       0 (an update with an exists precondition)             1
claim_due       k claimed, + 1 look-ahead per full chunk, + the ties  k
                at a chunk's last instant (rare); + 1 ``count()``
                (billed per 1,000 index entries); an empty query
                bills 1
claim(ids)      k named                                               k granted
complete        k, + 1 per event (the outbox)                         k accepted, + 1 per event
renew           k                                                     k held
release         1                                                     0 or 1
park_events     k                                                     k new
parked_events   the events returned (an empty query bills 1)          0
unpark_events   0                                                     k deletes
take_budget     1                                                     1 if granted, else 0
==============  ====================================================  ========================

One refresh therefore costs about 3 document reads and 3 writes of state (claim: 1 + 1;
renew before presenting: 1 + 1; complete: 1 + 1), batched up to ``chunk_size`` per commit;
a refresh that waits or retries renews again before each attempt, and every ``ttl / 3``
while its request is in flight. The server clock costs one read per process every 5 min.

Errors
------
``NotFound`` / ``AlreadyExists`` come from :mod:`~.kernel.errors`. Firestore unreachable or
overloaded (``ServiceUnavailable``, ``DeadlineExceeded``, ``InternalServerError``,
``ResourceExhausted``, too much contention) becomes ``StoreUnavailable`` (retryable); a missing
index, database or permission becomes ``ConfigError``. No google exception escapes.

The client library is imported when the first call needs it, never at module import (cold
start; see ``tokenbroker.adapters.gcp``).
"""

from __future__ import annotations

import builtins
import hashlib
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from tokenbroker.adapters import budget_log
from tokenbroker.adapters.gcp.errors import translate
from tokenbroker.kernel.clock import WallClock
from tokenbroker.kernel.errors import (
    AlreadyExists,
    ConfigError,
    NotFound,
    StoreUnavailable,
    TokenBrokerError,
)
from tokenbroker.kernel.model import (
    Claim,
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    Intent,
    Lease,
    RefreshState,
    Shard,
    bucket_of,
    slot_of,
)
from tokenbroker.ports import BudgetDecision, ClaimBatch, Completion

__all__ = ["DEFAULT_COLLECTION", "FirestoreStateStore", "stored_document"]

T = TypeVar("T")

DEFAULT_COLLECTION = "tokenbroker_connections"
FENCING_SUFFIX = "_fencing"
PARKED_SUFFIX = "_parked_events"
BUDGETS_SUFFIX = "_budgets"


class _OutboxOrder:
    """``seq`` of a parked event: microseconds since the epoch when it was parked, made
    strictly increasing within the process, as a fixed-width string with the process's tag
    (ties between processes break by tag), so ``order_by("seq")`` is oldest first.

    It used to come from one sequence document every commit read and wrote: every refresh
    commit of every refresher contended on that one document, so commits could not overlap
    (issue 13: four commit loops took the commits from 2 s to 78 s). Across processes the
    order is now the hosts' clocks' (Cloud Run's are synchronised to Google's NTP): the outbox
    is relayed oldest first as a courtesy, not a guarantee -- a connection's events are ordered
    by its commits, which its leases serialise, and subscribers order by ``version``. Numbers
    from before the change (integers) sort before every string: older first still."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0
        self._tag = uuid.uuid4().hex[:8]

    def next(self) -> str:
        with self._lock:
            self._last = max(self._last + 1, time.time_ns() // 1000)
            return f"{self._last:017d}-{self._tag}"


_OUTBOX_ORDER = _OutboxOrder()
#: Where :class:`ServerClock` reads the server's time (a document that never needs to exist).
CLOCK_SUFFIX = "_clock"
#: The project the client library itself falls back to on the emulator.
EMULATOR_PROJECT = "google-cloud-firestore-emulator"

#: Documents per transaction: under the historical 500-writes-per-commit limit, and small enough
#: that one transaction's locks stay short.
DEFAULT_CHUNK_SIZE = 250
#: Whole-transaction attempts on contention (see _transact).
_TRANSACTION_ATTEMPTS = 8
_BACKOFF_BASE_S = 0.05
_BACKOFF_MAX_S = 1.0

#: ``lease_expires_at`` of a connection nobody holds: long expired, and still a timestamp.
NO_LEASE = datetime(1970, 1, 1, tzinfo=UTC)
_ACTIVE = ConnectionStatus.ACTIVE.value
_LEASE_GIVEN_BACK: dict[str, Any] = {"lease_holder": None, "lease_expires_at": NO_LEASE}


# --- conversions ---------------------------------------------------------------------------


def _utc(value: Any) -> datetime | None:
    """A stored timestamp as a plain aware ``datetime`` (the client returns its own subclass,
    ``DatetimeWithNanoseconds``; Firestore keeps microseconds, which is all datetime has)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"expected a timestamp, got {type(value).__name__}")
    value = value.astimezone(UTC)
    return datetime(
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
        tzinfo=UTC,
    )


def _intent_fields(intent: Intent | None) -> dict[str, Any] | None:
    if intent is None:
        return None
    return {
        "attempt": intent.attempt,
        "from_version": intent.from_version,
        "token": intent.token,
        "at": intent.at,
    }


def _intent(data: Any) -> Intent | None:
    if not data:
        return None
    return Intent(
        attempt=str(data["attempt"]),
        from_version=data.get("from_version"),
        token=int(data["token"]),
        at=_utc(data.get("at")),
    )


def _state_fields(state: RefreshState) -> dict[str, Any]:
    return {
        "status": state.status.value,
        "expires_at": state.expires_at,
        "next_refresh_at": state.next_refresh_at,
        "last_refresh_at": state.last_refresh_at,
        "last_attempt_at": state.last_attempt_at,
        "consecutive_failures": state.consecutive_failures,
        "current_version": state.current_version,
        "last_error": state.last_error,
        "intent": _intent_fields(state.intent),
        "at_risk": state.at_risk,
    }


def _state(data: dict[str, Any]) -> RefreshState:
    return RefreshState(
        status=ConnectionStatus(data["status"]),
        expires_at=_utc(data.get("expires_at")),
        next_refresh_at=_utc(data.get("next_refresh_at")),
        last_refresh_at=_utc(data.get("last_refresh_at")),
        last_attempt_at=_utc(data.get("last_attempt_at")),
        consecutive_failures=int(data.get("consecutive_failures") or 0),
        current_version=data.get("current_version"),
        last_error=data.get("last_error"),
        intent=_intent(data.get("intent")),
        at_risk=bool(data.get("at_risk")),
    )


def _record(data: dict[str, Any]) -> ConnectionRecord:
    return ConnectionRecord(Connection.from_json(data["connection"]), _state(data))


def _lease_live(data: dict[str, Any], now: datetime) -> bool:
    """A lease is held and has not expired (one expiring exactly at ``now`` has)."""
    expires = _utc(data.get("lease_expires_at")) or NO_LEASE
    return data.get("lease_holder") is not None and expires > now


def _due_order(snapshot: Any) -> tuple[datetime, str]:
    """The reference adapters' order: earliest ``next_refresh_at`` first, then by id."""
    # Only scheduled connections match the due query; the fallback is for the type checker.
    due = _utc(snapshot.get("next_refresh_at")) or NO_LEASE
    return due, str(snapshot.id)


def _shard_fields(connection_id: str) -> dict[str, int]:
    """Where a sharded claim finds the connection: its slot and the slot's bucket."""
    slot = slot_of(connection_id)
    return {"slot": slot, "bucket": bucket_of(slot)}


def stored_document(
    connection: Connection, state: RefreshState, *, lease_token: int = 0
) -> dict[str, Any]:
    """A connection's document as this adapter stores it, nobody holding its lease.

    ``create`` writes exactly this (with the retired token of a deleted namesake); it is
    public for bulk imports into an empty collection (migrations, benchmarks), which may
    write it with batched writes instead of one transaction per connection.
    """
    return {
        "connection": connection.to_json(),
        **_shard_fields(connection.id),
        **_state_fields(state),
        **_LEASE_GIVEN_BACK,
        "lease_token": lease_token,
    }


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


#: What ``complete`` reads of each document: the fencing token and the current-version pointer.
_COMMIT_FIELDS = ["lease_token", "current_version"]

#: Writes one commit may carry, under Firestore's 500 (a chunk of completions writes one
#: document each and one per event).
_WRITES_PER_COMMIT = 450


def _write_chunks(items: Sequence[Completion], size: int) -> Iterator[Sequence[Completion]]:
    """At most ``size`` completions per chunk, and at most ``_WRITES_PER_COMMIT`` writes."""
    part: list[Completion] = []
    writes = 0
    for item in items:
        cost = 1 + len(item.events)
        if part and (len(part) >= size or writes + cost > _WRITES_PER_COMMIT):
            yield part
            part, writes = [], 0
        part.append(item)
        writes += cost
    if part:
        yield part


# --- errors --------------------------------------------------------------------------------


#: Firestore-specific meanings, checked before the mapping every Google adapter shares
#: (:func:`tokenbroker.adapters.gcp.errors.translate`): ABORTED is contention the transaction
#: retry loop already gave up on (retryable later); FAILED_PRECONDITION is almost always a
#: missing composite index and NOT_FOUND a missing database -- both deployment mistakes.
_FIRESTORE_ERRORS: dict[str, Callable[[str], TokenBrokerError]] = {
    "Aborted": lambda what: StoreUnavailable(f"{what}: ABORTED (too much contention)"),
    "FailedPrecondition": lambda what: ConfigError(
        f"{what}: FAILED_PRECONDITION (is a composite index missing? deploy "
        "google_firestore_index.due, terraform/modules/tokenbroker)"
    ),
    "NotFound": lambda what: ConfigError(f"{what}: NOT_FOUND (does the database exist?)"),
}


def _is_google(exc: BaseException) -> bool:
    return type(exc).__module__.startswith(("google.", "grpc"))


def _translate(exc: BaseException, action: str) -> TokenBrokerError | None:
    """The tokenbroker error for a google exception, or ``None`` if ``exc`` is not one."""
    if not _is_google(exc):
        return None
    module = type(exc).__module__
    name = type(exc).__name__
    what = f"Firestore {action}"
    if name in _FIRESTORE_ERRORS:
        return _FIRESTORE_ERRORS[name](what)
    if module.startswith("google.auth"):
        from google.auth import exceptions as auth  # noqa: PLC0415 - heavy, lazily

        if isinstance(exc, auth.TransportError):
            return StoreUnavailable(f"{what}: {name}")
        return ConfigError(f"{what}: {name} (check the credentials)")
    return translate(exc, what)


def _failed_rollback(exc: BaseException) -> bool:
    """The client library's own ValueError when a transaction whose begin or commit never
    reached the server is rolled back ("... cannot be rolled back"): it replaces the network
    error that caused it (found by the fault suite, Firestore unreachable mid-tick)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return (
        isinstance(exc, ValueError)
        and "rolled back" in str(exc)
        and str(raised_in).startswith("google.cloud.firestore")
    )


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except TokenBrokerError:
        raise
    except Exception as exc:
        if _failed_rollback(exc):
            raise StoreUnavailable(
                f"Firestore {action}: the transaction did not reach the server"
            ) from exc
        mapped = _translate(exc, action)
        if mapped is None:
            raise
        raise mapped from exc


# --- the server's clock --------------------------------------------------------------------


class ServerClock:
    """Firestore's time as this process knows it, for leases (never the local wall clock).

    A document get answers with the server's ``read_time``
    (https://cloud.google.com/firestore/docs/reference/rest/v1/projects.databases.documents/batchGet,
    ``readTime``); from that anchor this process's monotonic clock measures the time since --
    immune to steps of the local wall clock -- and the anchor is renewed every
    ``resync_seconds`` (monotonic clocks drift by parts per million). The reading is taken as
    of the end of the round trip, so it is never ahead of the server.
    """

    def __init__(self, store: FirestoreStateStore, *, resync_seconds: float = 300.0) -> None:
        self._store = store
        self._resync = resync_seconds
        self._lock = threading.Lock()
        self._anchor: tuple[datetime, float] | None = None

    def now(self) -> datetime:
        with self._lock:
            if self._anchor is None or time.monotonic() - self._anchor[1] > self._resync:
                self._anchor = self._read_server_time()
            server, mono = self._anchor
        return server + timedelta(seconds=time.monotonic() - mono)

    def _read_server_time(self) -> tuple[datetime, float]:
        store = self._store
        ref = store.client.collection(store.collection_name + CLOCK_SUFFIX).document("now")
        with _translated("read the server time"):
            snap = ref.get()
        mono = time.monotonic()
        with store._stats_lock:  # the clock is part of the store
            store.clock_reads += 1
        read_time = _utc(snap.read_time)
        if read_time is None:
            raise StoreUnavailable("Firestore answered without a read time")
        return read_time, mono


# --- the adapter ---------------------------------------------------------------------------


class FirestoreStateStore:
    """Connection registry, refresh state and fenced leases in one Firestore collection.

    ``client``: a ``google.cloud.firestore.Client``; when ``None`` one is built on first use
    for ``project`` and ``database``: on the real service, or, given ``emulator_host``
    (``host:port``, tests and local runs only), on the Firestore emulator there, with anonymous
    credentials so no Application Default Credentials are looked up. The composition root
    passes ``emulator_host`` from its settings; this class reads no environment (the client
    library still honours ``FIRESTORE_EMULATOR_HOST`` by itself, as documented at
    https://cloud.google.com/firestore/docs/emulator#connect_to_the_emulator).

    ``lease_clock``: where lease time comes from -- by default :class:`ServerClock`, the
    server's time (tests pass a manual clock).

    ``documents_read`` counts every document snapshot this handle has read (query results and
    gets, including gets of documents that do not exist); ``aggregations_run`` counts ``count()``
    queries and ``transactions_run`` transaction attempts; ``clock_reads`` the document reads
    of the server clock (one per process every five minutes). ``documents_read``,
    ``aggregations_run`` and ``clock_reads`` bound what Firestore bills for reads.
    """

    #: How long one ``prepare_shards`` call may spend writing the fields records lack.
    PREPARE_SECONDS = 60.0

    def __init__(
        self,
        client: Any = None,
        *,
        project: str | None = None,
        database: str = "(default)",
        collection: str = DEFAULT_COLLECTION,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        emulator_host: str | None = None,
        lease_clock: WallClock | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ConfigError("chunk_size must be at least 1")
        self._client = client
        self._owns_client = client is None
        self._project = project
        self._database = database
        self._emulator_host = emulator_host or None
        self.collection_name = collection
        self.chunk_size = chunk_size
        self._client_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.documents_read = 0
        self.aggregations_run = 0
        self.transactions_run = 0
        self.clock_reads = 0
        self.lease_clock: WallClock = lease_clock or ServerClock(self)

    # -- plumbing --------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The Firestore client, built on first use (importing the library is slow)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = self._build_client()
        return self._client

    def _build_client(self) -> Any:
        with _translated("client setup"):
            from google.cloud import firestore  # noqa: PLC0415 - heavy, lazily

            if self._emulator_host is None:
                return firestore.Client(project=self._project, database=self._database)
            from google.auth.credentials import AnonymousCredentials  # noqa: PLC0415 - heavy, lazily

            client = firestore.Client(
                project=self._project or EMULATOR_PROJECT,
                database=self._database,
                credentials=AnonymousCredentials(),
            )
            # The library has no public switch for the emulator but its environment variable,
            # which it copies into this attribute in its constructor and reads from there only,
            # on first use (insecure channel, emulator metadata). Setting it before any call
            # does what the variable does, without this process's environment.
            if not hasattr(client, "_emulator_host"):
                raise ConfigError(
                    "this google-cloud-firestore cannot be pointed at an emulator explicitly;"
                    " set FIRESTORE_EMULATOR_HOST instead"
                )
            client._emulator_host = self._emulator_host
            return client

    def close(self) -> None:
        """Close the client's channel, if this handle built the client."""
        with self._client_lock:
            if self._client is not None and self._owns_client:
                self._client.close()
                self._client = None

    def _collection(self) -> Any:
        return self.client.collection(self.collection_name)

    def _doc(self, connection_id: str) -> Any:
        return self._collection().document(connection_id)

    def _tombstone(self, connection_id: str) -> Any:
        return self.client.collection(self.collection_name + FENCING_SUFFIX).document(connection_id)

    def _read(self, snapshots: Iterable[Any]) -> builtins.list[Any]:
        found = list(snapshots)
        with self._stats_lock:
            self.documents_read += len(found)
        return found

    def _count(self, query: Any) -> int:
        with self._stats_lock:
            self.aggregations_run += 1
        (results,) = query.count(alias="n").get()
        return int(results[0].value)

    def _transact(self, body: Callable[[Any], T]) -> T:
        """Run ``body(transaction)`` in a read-write transaction, retried on contention.

        Contention surfaces as ABORTED, from a read or from the commit. The client library
        would retry only the commit, at once; retrying the whole transaction after a jittered
        pause lets racing claimers fall out of step instead of colliding again. (Measured on
        the emulator, which resolves a lock conflict by timing it out after ~2 s: four claimers
        retrying in lockstep collided again and again, for tens of seconds.)
        """
        from google.api_core import exceptions as api  # noqa: PLC0415 - heavy, lazily
        from google.cloud import firestore  # noqa: PLC0415 - heavy, lazily

        for attempt in range(_TRANSACTION_ATTEMPTS):
            with self._stats_lock:
                self.transactions_run += 1
            transaction = self.client.transaction(max_attempts=1)
            try:
                return firestore.transactional(body)(transaction)  # type: ignore[no-any-return]
            except api.Aborted:
                pass
            except ValueError as exc:  # "Failed to commit transaction in N attempts"
                if not isinstance(exc.__cause__, api.Aborted):
                    raise
            delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt)
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
        raise StoreUnavailable(
            f"Firestore: too much contention, gave up after {_TRANSACTION_ATTEMPTS} transactions"
        )

    # -- the registry ----------------------------------------------------------------------

    def create(self, connection: Connection, state: RefreshState) -> None:
        ref, tomb = self._doc(connection.id), self._tombstone(connection.id)

        def body(transaction: Any) -> None:
            snaps = {s.reference.path: s for s in self._read(transaction.get_all([ref, tomb]))}
            if snaps[ref.path].exists:
                raise AlreadyExists(f"connection {connection.id!r} already exists")
            retired = snaps[tomb.path].get("lease_token") if snaps[tomb.path].exists else 0
            transaction.create(ref, stored_document(connection, state, lease_token=int(retired)))

        with _translated("create"):
            try:
                self._transact(body)
            except Exception as exc:
                if type(exc).__name__ == "AlreadyExists" and _is_google(exc):
                    # A racing create committed between our read and our commit.
                    raise AlreadyExists(f"connection {connection.id!r} already exists") from None
                raise

    def get(self, connection_id: str) -> ConnectionRecord:
        with _translated("get"):
            (snap,) = self._read([self._doc(connection_id).get()])
        if not snap.exists:
            raise NotFound(f"connection {connection_id!r} not found")
        return _record(snap.to_dict())

    # -- the current-version pointer (VersionPointers) -------------------------------------

    def current_versions(self, connection_ids: Sequence[str]) -> dict[str, int | None]:
        """One batched read (``BatchGetDocuments``) for all of them."""
        ids = list(dict.fromkeys(connection_ids))
        if not ids:
            return {}
        with _translated("current_versions"):
            snaps = self._read(self.client.get_all([self._doc(cid) for cid in ids]))
        return {str(s.id): s.to_dict().get("current_version") for s in snaps if s.exists}

    def move_pointer(
        self, connection_id: str, *, accepted: frozenset[int | None] | None, version: int | None
    ) -> bool:
        """A transaction: read the record, compare, write the pointer alone (the lease and
        the rest of the state are left as they are)."""
        ref = self._doc(connection_id)

        def body(transaction: Any) -> bool:
            (snap,) = self._read(transaction.get(ref))
            if not snap.exists:
                return False
            if accepted is not None and snap.to_dict().get("current_version") not in accepted:
                return False
            transaction.update(ref, {"current_version": version})
            return True

        with _translated("move_pointer"):
            return bool(self._transact(body))

    def list(self) -> builtins.list[ConnectionRecord]:
        with _translated("list"):
            snaps = self._read(self._collection().stream())
        return [_record(s.to_dict()) for s in sorted(snaps, key=lambda s: str(s.id))]

    def delete(self, connection_id: str) -> None:
        ref, tomb = self._doc(connection_id), self._tombstone(connection_id)

        def body(transaction: Any) -> None:
            (snap,) = self._read(transaction.get(ref))
            if not snap.exists:
                raise NotFound(f"connection {connection_id!r} not found")
            # Retire the fencing token: a lease from before the delete must never match a
            # lease on a connection re-created under the same id.
            transaction.set(tomb, {"lease_token": int(snap.get("lease_token")) + 1})
            transaction.delete(ref)

        with _translated("delete"):
            self._transact(body)

    def put_state(self, connection_id: str, state: RefreshState) -> None:
        """One write: ``update`` carries an exists precondition, so nothing needs reading.

        The operator's write wins over a refresh in flight: ``Increment`` grows the fencing
        token server-side (no read needed) and the lease is freed, so that refresh can neither
        renew nor commit over this state."""
        from google.cloud import firestore  # noqa: PLC0415 - heavy, lazily

        fields = {
            **_state_fields(state),
            **_LEASE_GIVEN_BACK,
            "lease_token": firestore.Increment(1),
        }
        with _translated("put_state"):
            try:
                self._doc(connection_id).update(fields)
            except Exception as exc:
                if type(exc).__name__ == "NotFound" and _is_google(exc):
                    raise NotFound(f"connection {connection_id!r} not found") from None
                raise

    # -- leases ----------------------------------------------------------------------------

    def _grant(
        self, transaction: Any, snap: Any, lease_now: datetime, holder: str, ttl: timedelta
    ) -> Claim:
        token = int(snap.get("lease_token")) + 1
        expires = lease_now + ttl
        transaction.update(
            snap.reference,
            {"lease_holder": holder, "lease_token": token, "lease_expires_at": expires},
        )
        return Claim(Lease(str(snap.id), holder, token, expires), _record(snap.to_dict()))

    def _where(self, *conditions: tuple[str, str, Any]) -> Any:
        from google.cloud.firestore import FieldFilter  # noqa: PLC0415 - heavy, lazily

        query = self._collection().where(filter=FieldFilter("status", "==", _ACTIVE))
        for field, op, value in conditions:
            query = query.where(filter=FieldFilter(field, op, value))
        return query

    def _where_in(self, shard: Shard | None, *conditions: tuple[str, str, Any]) -> Any:
        """``_where``, narrowed to the shard: its buckets (an ``in``: one index range per
        bucket, so shards' claims read disjoint index entries) and its slot range (the same
        buckets' slots up to ``BUCKETS`` shards; part of a bucket beyond)."""
        if shard is None or shard.everything:
            return self._where(*conditions)
        slots = shard.slots
        return self._where(
            ("bucket", "in", list(shard.buckets)),
            *conditions,
            ("slot", ">=", slots[0]),
            ("slot", "<=", slots[-1]),
        )

    def _free_due(self, now: datetime, lease_now: datetime, shard: Shard | None = None) -> Any:
        """Active, due by ``now``, and nobody's lease is live by the store's ``lease_now``:
        what ``claim_due`` may take."""
        return self._where_in(
            shard, ("next_refresh_at", "<=", now), ("lease_expires_at", "<=", lease_now)
        ).order_by("next_refresh_at")

    def _free_at(self, lease_now: datetime, instant: datetime, shard: Shard | None = None) -> Any:
        """Free connections due at exactly ``instant`` (ties at a chunk's last place)."""
        return self._where_in(
            shard, ("next_refresh_at", "==", instant), ("lease_expires_at", "<=", lease_now)
        )

    def _leased_due(self, now: datetime, lease_now: datetime, shard: Shard | None = None) -> Any:
        """Active and due, under a live lease: what ``leased_elsewhere`` counts."""
        return self._where_in(
            shard, ("next_refresh_at", "<=", now), ("lease_expires_at", ">", lease_now)
        ).order_by("next_refresh_at")

    def queries(self, now: datetime) -> builtins.list[Any]:
        """Every query this adapter runs, to check the shipped index definitions against."""
        return [
            query
            for shard in (None, Shard(0, 2))
            for query in (
                self._free_due(now, now, shard),
                self._free_at(now, now, shard),
                self._leased_due(now, now, shard),
            )
        ]

    def claim_due(
        self,
        now: datetime,
        *,
        holder: str,
        ttl: timedelta,
        limit: int,
        shard: Shard | None = None,
    ) -> ClaimBatch:
        def chunk(size: int) -> Callable[[Any], tuple[builtins.list[Claim], bool]]:
            def body(transaction: Any) -> tuple[builtins.list[Claim], bool]:
                lease_now = self.lease_clock.now()
                chosen, more = self._candidates(transaction.get, now, lease_now, size, None)
                grants = [self._grant(transaction, snap, lease_now, holder, ttl) for snap in chosen]
                return grants, more

            return body

        with _translated("claim_due"):
            leased_elsewhere = self._count(self._leased_due(now, self.lease_clock.now(), shard))
            claims: builtins.list[Claim] = []
            more = True
            while more and len(claims) < limit:
                size = min(self.chunk_size, limit - len(claims))
                if shard is None or shard.everything:
                    got, more = self._transact(chunk(size))
                else:
                    got, more = self._claim_in_shard(now, shard, size, holder, ttl)
                claims.extend(got)
        return ClaimBatch(claims, leased_elsewhere=leased_elsewhere)

    def _candidates(
        self,
        run: Callable[[Any], Iterable[Any]],
        now: datetime,
        lease_now: datetime,
        size: int,
        shard: Shard | None,
    ) -> tuple[builtins.list[Any], bool]:
        """The next ``size`` free due documents in the reference order (``run`` runs a query:
        in a transaction or not), and whether more are due."""
        # One more than needed: it tells whether more are due, and whether the last place
        # taken is shared with connections left out.
        found = self._read(run(self._free_due(now, lease_now, shard).limit(size + 1)))
        more = len(found) > size
        if more:
            last = _utc(found[size - 1].get("next_refresh_at"))
            if _utc(found[size].get("next_refresh_at")) == last and last is not None:
                # Firestore breaks ties on next_refresh_at by lease_expires_at, the reference
                # order by id: read connections due at that instant too. Bounded: at most
                # ``size`` of them, so a crowd due at one instant (a bulk import) costs at
                # most twice the due count, not N².
                ties = self._read(run(self._free_at(lease_now, last, shard).limit(size)))
                found = list({s.id: s for s in [*found, *ties]}.values())
        return sorted(found, key=_due_order)[:size], more

    def _claim_in_shard(
        self, now: datetime, shard: Shard, size: int, holder: str, ttl: timedelta
    ) -> tuple[builtins.list[Claim], bool]:
        """A shard's chunk: the candidates found by a query outside any transaction, then one
        transaction that reads exactly those documents, grants those still active, due and
        free, and skips the rest (another claimer took them meanwhile). Only the candidates'
        documents are locked, never a query's range: workers on different shards never
        contend (a query inside the transaction did, on the emulator, whatever its filter:
        ``bench/fanout.py``), and racing claimers of one shard still never both get a
        connection -- both transactions read and write the same documents."""
        chosen, more = self._candidates(
            lambda query: query.stream(), now, self.lease_clock.now(), size, shard
        )
        if not chosen:
            return [], more

        def body(transaction: Any) -> builtins.list[Claim]:
            lease_now = self.lease_clock.now()
            snaps = self._read(transaction.get_all([s.reference for s in chosen]))
            current = {str(s.id): s for s in snaps if s.exists}
            grants = []
            for candidate in chosen:
                snap = current.get(str(candidate.id))
                if snap is None:
                    continue  # deleted meanwhile
                fields = snap.to_dict()
                due = _utc(fields.get("next_refresh_at"))
                if fields.get("status") != _ACTIVE or due is None or due > now:
                    continue
                if _lease_live(fields, lease_now):
                    continue
                grants.append(self._grant(transaction, snap, lease_now, holder, ttl))
            return grants

        return self._transact(body), more

    def prepare_shards(self) -> int:
        """Two ``count()`` aggregations when every record holds its ``bucket`` (billed one read
        per 1,000 index entries); otherwise a pass over the collection reading only ``bucket``
        (a field mask, streamed) and a batched ``update`` of the records that lack it --
        written before the field existed -- for at most ``PREPARE_SECONDS``: a collection too
        big for one call is finished by the next ones (the counts still differ), so a
        scheduled call is never held up for long. ``update`` touches those fields alone and
        carries an exists precondition, so it races safely with commits and a deleted record
        stays deleted."""
        from google.cloud.firestore import FieldFilter  # noqa: PLC0415 - heavy, lazily

        with _translated("prepare_shards"):
            placed = self._count(self._collection().where(filter=FieldFilter("bucket", ">=", 0)))
            if placed >= self._count(self._collection()):
                return 0
            deadline = time.monotonic() + self.PREPARE_SECONDS
            written, lacking = 0, []
            for snap in self._collection().select(["bucket"]).stream():
                self._read([snap])
                if snap.to_dict().get("bucket") is None:
                    lacking.append(str(snap.id))
                if len(lacking) >= _WRITES_PER_COMMIT:
                    self._write_slots(lacking)
                    written, lacking = written + len(lacking), []
                    if time.monotonic() > deadline:
                        return written
            if lacking:
                self._write_slots(lacking)
        return written + len(lacking)

    def _write_slots(self, connection_ids: Sequence[str]) -> None:
        batch = self.client.batch()
        for cid in connection_ids:
            batch.update(self._doc(cid), _shard_fields(cid))
        try:
            batch.commit()
        except Exception as exc:
            if not (type(exc).__name__ == "NotFound" and _is_google(exc)):
                raise
            # One of them was deleted meanwhile (the batch is all or nothing): one by one.
            for cid in connection_ids:
                try:
                    self._doc(cid).update(_shard_fields(cid))
                except Exception as one:
                    if not (type(one).__name__ == "NotFound" and _is_google(one)):
                        raise

    def claim(
        self,
        connection_ids: Sequence[str],
        now: datetime,  # noqa: ARG002 - the port's signature: a named claim ignores due-ness
        *,
        holder: str,
        ttl: timedelta,
    ) -> ClaimBatch:
        def chunk(ids: Sequence[str]) -> Callable[[Any], ClaimBatch]:
            def body(transaction: Any) -> ClaimBatch:
                lease_now = self.lease_clock.now()
                refs = [self._doc(cid) for cid in ids]
                snaps = {str(s.id): s for s in self._read(transaction.get_all(refs))}
                claims: builtins.list[Claim] = []
                missing: builtins.list[str] = []
                inactive: dict[str, ConnectionStatus] = {}
                leased = 0
                for cid in ids:
                    snap = snaps.get(cid)
                    if snap is None or not snap.exists:
                        missing.append(cid)
                    elif snap.get("status") != _ACTIVE:
                        inactive[cid] = ConnectionStatus(snap.get("status"))
                    elif _lease_live(snap.to_dict(), lease_now):
                        leased += 1
                    else:
                        claims.append(self._grant(transaction, snap, lease_now, holder, ttl))
                return ClaimBatch(
                    claims, leased_elsewhere=leased, missing=missing, inactive=inactive
                )

            return body

        claims: builtins.list[Claim] = []
        missing: builtins.list[str] = []
        inactive: dict[str, ConnectionStatus] = {}
        leased_elsewhere = 0
        with _translated("claim"):
            for ids in _chunks(list(dict.fromkeys(connection_ids)), self.chunk_size):
                batch = self._transact(chunk(ids))
                claims.extend(batch.claims)
                missing.extend(batch.missing)
                inactive.update(batch.inactive)
                leased_elsewhere += batch.leased_elsewhere
        return ClaimBatch(
            claims, leased_elsewhere=leased_elsewhere, missing=missing, inactive=inactive
        )

    def renew(
        self,
        leases: Sequence[Lease],
        *,
        ttl: timedelta,
        intents: Sequence[Intent | None] | None = None,
    ) -> builtins.list[Lease | None]:
        paired = list(zip(leases, intents or [None] * len(leases), strict=True))

        def chunk(
            part: Sequence[tuple[Lease, Intent | None]],
        ) -> Callable[[Any], builtins.list[Lease | None]]:
            def body(transaction: Any) -> builtins.list[Lease | None]:
                lease_now = self.lease_clock.now()
                expires = lease_now + ttl
                ids = list(dict.fromkeys(lease.connection_id for lease, _ in part))
                snaps = self._read(transaction.get_all([self._doc(cid) for cid in ids]))
                held = {
                    str(s.id): s.get("lease_token")
                    for s in snaps
                    if s.exists and s.get("lease_holder") is not None
                }
                results: builtins.list[Lease | None] = []
                writes: dict[str, dict[str, Any]] = {}
                for lease, intent in part:
                    if held.get(lease.connection_id) != lease.token:
                        results.append(None)
                        continue
                    results.append(replace(lease, expires_at=expires))
                    fields = writes.setdefault(lease.connection_id, {"lease_expires_at": expires})
                    if intent is not None:
                        fields["intent"] = _intent_fields(replace(intent, at=lease_now))
                for cid, fields in writes.items():  # one write per document per commit
                    transaction.update(self._doc(cid), fields)
                return results

            return body

        results: builtins.list[Lease | None] = []
        with _translated("renew"):
            for part in _chunks(paired, self.chunk_size):
                results.extend(self._transact(chunk(part)))
        return results

    def complete(
        self, outcomes: Sequence[Completion | tuple[Lease, RefreshState]]
    ) -> builtins.list[bool]:
        """The fencing check and the state write in one transaction per chunk, with the
        events of the accepted outcomes parked in the same transaction (the outbox; relayed
        by the refresher), ordered as ``park_events`` orders them (:class:`_OutboxOrder`: no
        document shared by every commit). Chunks stay under the per-commit write limit."""
        done = [o if isinstance(o, Completion) else Completion(*o) for o in outcomes]

        def chunk(part: Sequence[Completion]) -> Callable[[Any], builtins.list[bool]]:
            def body(transaction: Any) -> builtins.list[bool]:
                ids = list(dict.fromkeys(c.lease.connection_id for c in part))
                events = {e.event_id: e for c in part for e in c.events}
                event_refs = {eid: self._parked(eid) for eid in events}
                refs = [self._doc(cid) for cid in ids]
                if events:
                    refs += event_refs.values()
                # Only the two fields the checks need (a field mask): the server sends, and
                # the client decodes and copies, two values a document instead of all of them
                # -- the commit's largest client CPU cost (issue 13). Event documents are
                # read for their existence only.
                masked = self.client.get_all(
                    refs, field_paths=_COMMIT_FIELDS, transaction=transaction
                )
                snaps = {s.reference.path: s for s in self._read(masked)}
                fields = {
                    cid: snaps[self._doc(cid).path].to_dict()
                    for cid in ids
                    if snaps[self._doc(cid).path].exists
                }
                tokens = {cid: found.get("lease_token") for cid, found in fields.items()}
                pointers = {cid: found.get("current_version") for cid, found in fields.items()}
                writes: dict[str, dict[str, Any]] = {}
                accepted_events: dict[str, ConnectionEvent] = {}
                results: builtins.list[bool] = []
                for completion in part:
                    lease = completion.lease
                    # The fencing check: only the newest token granted on this connection may
                    # write. A deleted connection has none; a re-created one starts above every
                    # token granted before the delete.
                    accepted = tokens.get(lease.connection_id) == lease.token and (
                        completion.pointer_from is None
                        or pointers.get(lease.connection_id) in completion.pointer_from
                    )
                    if accepted:
                        writes[lease.connection_id] = {
                            **_state_fields(completion.state),
                            **_LEASE_GIVEN_BACK,
                        }
                        for event in completion.events:
                            accepted_events.setdefault(event.event_id, event)
                    results.append(accepted)
                for cid, fields in writes.items():  # one write per document per commit
                    transaction.update(self._doc(cid), fields)
                for eid, event in accepted_events.items():
                    if not snaps[event_refs[eid].path].exists:
                        parked = {"seq": _OUTBOX_ORDER.next(), "event": event.to_json()}
                        transaction.create(event_refs[eid], parked)
                return results

            return body

        results: builtins.list[bool] = []
        with _translated("complete"):
            for part in _write_chunks(done, self.chunk_size):
                results.extend(self._transact(chunk(part)))
        return results

    def release(self, lease: Lease) -> None:
        ref = self._doc(lease.connection_id)

        def body(transaction: Any) -> None:
            (snap,) = self._read(transaction.get(ref))
            if not snap.exists or snap.get("lease_holder") is None:
                return  # deleted, completed or released: nothing to give back
            if snap.get("lease_token") == lease.token:
                transaction.update(ref, dict(_LEASE_GIVEN_BACK))

        with _translated("release"):
            self._transact(body)

    # -- parked events ---------------------------------------------------------------------

    def _parked(self, event_id: str | None = None) -> Any:
        """The parked-events collection, or one event's document in it. Documents are named
        by a hash of the event id, so any id makes a valid document name."""
        parked = self.client.collection(self.collection_name + PARKED_SUFFIX)
        if event_id is None:
            return parked
        return parked.document(hashlib.sha256(event_id.encode()).hexdigest())

    def park_events(self, events: Sequence[ConnectionEvent]) -> None:
        """Keep the events the bus could not take, each once (the first copy wins), in order
        (:class:`_OutboxOrder`), so ``parked_events`` returns them oldest first as the
        reference adapters do. One transaction per chunk."""
        first: dict[str, ConnectionEvent] = {}
        for event in events:
            first.setdefault(event.event_id, event)

        def chunk(part: Sequence[ConnectionEvent]) -> Callable[[Any], None]:
            def body(transaction: Any) -> None:
                refs = [self._parked(e.event_id) for e in part]
                snaps = {s.reference.path: s for s in self._read(transaction.get_all(refs))}
                for ref, event in zip(refs, part, strict=True):
                    if not snaps[ref.path].exists:
                        order = _OUTBOX_ORDER.next()
                        transaction.create(ref, {"seq": order, "event": event.to_json()})

            return body

        with _translated("park_events"):
            for part in _chunks(builtins.list(first.values()), self.chunk_size):
                self._transact(chunk(part))

    def parked_events(self, limit: int) -> builtins.list[ConnectionEvent]:
        if limit <= 0:
            return []
        with _translated("parked_events"):
            query = self._parked().order_by("seq").limit(limit)
            snaps = self._read(query.stream())
        return [ConnectionEvent.from_json(s.get("event")) for s in snaps]

    def unpark_events(self, event_ids: Sequence[str]) -> None:
        """Blind deletes in batches: deleting a document that is not there is not an error."""
        with _translated("unpark_events"):
            for part in _chunks(list(dict.fromkeys(event_ids)), self.chunk_size):
                batch = self.client.batch()
                for event_id in part:
                    batch.delete(self._parked(event_id))
                batch.commit()

    # -- token-endpoint budgets ------------------------------------------------------------

    def _budget(self, key: str) -> Any:
        """A budget's document, named by a hash of its key (see the module docstring)."""
        budgets = self.client.collection(self.collection_name + BUDGETS_SUFFIX)
        return budgets.document(hashlib.sha256(key.encode()).hexdigest())

    def change_marker(self) -> object:
        """Firestore has no cheap one: a new value every call, so callers read."""
        return object()

    def take_budget(
        self, key: str, *, limit: int, window: timedelta, now: datetime, cost: int = 1
    ) -> BudgetDecision:
        """One transaction on the key's document: read the takes, decide, write on a grant."""
        budget_log.check_arguments(key, limit=limit, window=window, now=now, cost=cost)
        ref = self._budget(key)

        def body(transaction: Any) -> BudgetDecision:
            (snap,) = self._read(transaction.get(ref))
            stored: builtins.list[budget_log.Take] = []
            if snap.exists:
                if snap.get("key") != key:
                    raise ConfigError(f"budget {key!r}: its document holds another key")
                raw = snap.get("takes")
                pairs = (
                    [[t.get("at"), t.get("cost")] if isinstance(t, dict) else t for t in raw]
                    if isinstance(raw, builtins.list)
                    else raw
                )
                stored = budget_log.parse_takes(pairs, key)
            result = budget_log.take(stored, limit=limit, window=window, now=now, cost=cost)
            if result.must_write:
                expires = budget_log.from_micros(result.expires_at) + budget_log.GC_GRACE
                transaction.set(
                    ref,
                    {
                        "key": key,
                        "takes": [{"at": at, "cost": c} for at, c in result.takes],
                        "expires_at": expires,
                    },
                )
            return result.decision

        with _translated("take_budget"):
            return self._transact(body)
