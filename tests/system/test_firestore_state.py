"""FirestoreStateStore behaviour beyond the StateStore contract, on the official emulator.

The contract suite (tests/contract/test_state_store.py) runs against Firestore too; this file
checks what is specific to the adapter: chunked claims, reads that grow with the due set and
not the registry, racing claimers across chunks, the same answers as the reference adapter
over a long random history, lazy imports, error translation and the Terraform's index.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.contract.builders import T0, ManualClock, connection, due_state, event
from tests.contract.racing import race
from tests.deploy import hcl
from tests.support.emulators import emulator
from tokenbroker.adapters.gcp.firestore import (
    DEFAULT_COLLECTION,
    FirestoreStateStore,
    stored_document,
)
from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import AlreadyExists, ConfigError, NotFound, StoreUnavailable
from tokenbroker.kernel.model import (
    ConnectionStatus,
    Lease,
    RefreshState,
    Shard,
    bucket_of,
    slot_of,
)
from tokenbroker.ports import ClaimBatch, StateStore

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
TTL = timedelta(seconds=60)
S = timedelta(seconds=1)


@pytest.fixture
def clock() -> ManualClock:
    """The lease clock of the stores a test opens (leases run on the store's clock)."""
    return ManualClock()


@pytest.fixture
def open_store(clock: ManualClock) -> Iterator[Callable[..., FirestoreStateStore]]:
    """Open handles (each its own client) on one fresh emulator project, their leases on
    ``clock`` (pass ``lease_clock=None`` for the server's clock)."""
    host = emulator("firestore").host
    project = f"tb-sys-{uuid.uuid4().hex[:12]}"
    opened: list[FirestoreStateStore] = []

    def open_(**kwargs: Any) -> FirestoreStateStore:
        kwargs.setdefault("lease_clock", clock)
        store = FirestoreStateStore(project=project, emulator_host=host, **kwargs)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def _ids(batch: ClaimBatch) -> list[str]:
    return [c.lease.connection_id for c in batch.claims]


def test_module_import_does_not_import_the_client_library() -> None:
    code = (
        "import sys, tokenbroker.adapters.gcp.firestore as m; "
        "m.FirestoreStateStore(project='p'); "
        "print(sorted(n for n in sys.modules if n.startswith(('google.cloud.firestore', "
        "'google.api_core', 'grpc'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]"


def test_the_emulator_is_a_setting_passed_in_not_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``FIRESTORE_EMULATOR_HOST`` gone from the process, the store still reaches the
    emulator: the settings read the variable, the composition root passes it as
    ``emulator_host``, and neither the adapter nor the client library needs the environment."""
    host = emulator("firestore").host
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST")
    project = f"tb-sys-{uuid.uuid4().hex[:12]}"
    settings = Settings.from_env(
        {
            "TOKENBROKER_BACKEND": "memory",
            "TOKENBROKER_STATE_STORE": "firestore",
            "TOKENBROKER_GCP_PROJECT": project,
            "FIRESTORE_EMULATOR_HOST": host,
        }
    )
    assert settings.firestore_emulator_host == host
    runtime = build_runtime(settings)
    other = FirestoreStateStore(project=project, emulator_host=host)
    try:
        runtime.state.create(connection("c1"), due_state(T0))
        assert [r.connection.id for r in other.list()] == ["c1"]
        assert runtime.state.get("c1").state == due_state(T0)
    finally:
        other.close()
        runtime.state.close()  # type: ignore[attr-defined]
        runtime.close()


def test_a_large_claim_runs_in_chunks_earliest_first(
    open_store: Callable[..., FirestoreStateStore], clock: ManualClock
) -> None:
    store = open_store(chunk_size=4)
    for n in range(11):
        store.create(connection(f"c{n:02d}"), due_state(T0 - (20 - n) * S))
    store.create(connection("later"), due_state(T0 + S))
    batch = store.claim_due(T0, holder="h", ttl=TTL, limit=100)
    assert _ids(batch) == [f"c{n:02d}" for n in range(11)]
    assert batch.leased_elsewhere == 0
    # A limit that is not a multiple of the chunk size stops exactly at the limit.
    other = open_store(chunk_size=4)
    now = clock.set(T0 + TTL)
    assert other.claim_due(now, holder="x", ttl=TTL, limit=6).claims[5].lease.holder == "x"
    assert other.claim_due(now, holder="y", ttl=TTL, limit=100).leased_elsewhere == 6


def test_documents_read_grow_with_the_due_set_not_the_registry(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    store = open_store(chunk_size=3)
    for n in range(60):
        due = n % 12 == 0  # 5 of 60 due, at distinct instants
        at = T0 - n * S if due else T0 + timedelta(hours=1)
        store.create(connection(f"c{n:02d}"), due_state(at))
    before = store.documents_read
    batch = store.claim_due(T0, holder="h", ttl=TTL, limit=1000)
    assert len(batch.claims) == 5
    # Each due document once, plus the look-ahead of the one full chunk (read again later).
    assert store.documents_read - before == 5 + 1
    # Completing reads each leased document once, and nothing else.
    before = store.documents_read
    outcomes = [(c.lease, due_state(T0 + timedelta(hours=1))) for c in batch.claims]
    assert store.complete(outcomes) == [True] * 5
    assert store.documents_read - before == 5


def test_leases_run_on_the_servers_clock(open_store: Callable[..., FirestoreStateStore]) -> None:
    """By default the lease clock is Firestore's (read_time of a document read, then this
    process's monotonic clock), never the refresher's wall clock; every handle agrees."""
    from datetime import UTC, datetime

    a, b = open_store(lease_clock=None), open_store(lease_clock=None)
    a.create(connection("c1"), due_state(T0))
    before = datetime.now(UTC)
    (claim,) = a.claim(["c1"], T0, holder="a", ttl=TTL).claims
    after = datetime.now(UTC)
    # The emulator runs on this host, so its clock is ours, to within a round trip.
    assert before + TTL - 2 * S <= claim.lease.expires_at <= after + TTL + 2 * S
    assert b.claim(["c1"], T0 + timedelta(days=1), holder="b", ttl=TTL).leased_elsewhere == 1
    (renewed,) = b.renew([claim.lease], ttl=2 * TTL)
    assert renewed is not None and renewed.expires_at > claim.lease.expires_at
    assert a.clock_reads == 1 and b.clock_reads == 1  # once per handle, not per call


def test_connections_due_at_the_same_instant_are_taken_by_id(
    open_store: Callable[..., FirestoreStateStore], clock: ManualClock
) -> None:
    """Firestore orders equal ``next_refresh_at`` by ``lease_expires_at``; the reference by
    id. An expired lease must not push a connection ahead of its peers."""
    stores: list[StateStore] = [open_store(chunk_size=2), MemoryStateStore(clock)]
    clock.set(T0 - 80 * S)
    for store in stores:
        for cid in ("a", "b", "c", "d"):
            store.create(connection(cid), due_state(T0 - 90 * S))
        store.claim(["c", "d"], T0 - 80 * S, holder="dead", ttl=TTL)  # expired at T0 - 20 s
    clock.set(T0)
    picks = [_ids(s.claim_due(T0, holder="h", ttl=TTL, limit=3)) for s in stores]
    assert picks == [["a", "b", "c"], ["a", "b", "c"]]


def test_an_expired_lease_is_ordered_by_its_refresh_time_like_the_reference(
    open_store: Callable[..., FirestoreStateStore], clock: ManualClock
) -> None:
    """A crashed holder's connection keeps its place: it is due since ``next_refresh_at``,
    not since its lease expired (that is when it became claimable again)."""
    stores: list[StateStore] = [open_store(), MemoryStateStore(clock)]
    clock.set(T0 - 70 * S)
    for store in stores:
        store.create(connection("crashed"), due_state(T0 - 100 * S))
        store.create(connection("waiting"), due_state(T0 - 50 * S))
        assert _ids(store.claim(["crashed"], T0 - 70 * S, holder="dead", ttl=TTL)) == ["crashed"]
    clock.set(T0)
    picks = [_ids(s.claim_due(T0, holder="h", ttl=TTL, limit=1)) for s in stores]
    assert picks == [["crashed"], ["crashed"]]


def test_racing_claimers_across_chunks_never_share_a_connection(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    setup = open_store()
    due = 30
    for n in range(due):
        setup.create(connection(f"c{n:03d}"), due_state(T0 - n * S))
    racers = [open_store(chunk_size=7) for _ in range(3)]
    batches = race(
        [partial(s.claim_due, T0, holder=f"h{n}", ttl=TTL, limit=due) for n, s in enumerate(racers)]
    )
    assert all(isinstance(b, ClaimBatch) for b in batches), batches
    claimed = [cid for b in batches for cid in _ids(b)]  # type: ignore[arg-type]
    assert sorted(claimed) == [f"c{n:03d}" for n in range(due)]


def test_racing_completions_with_a_takeover_accept_exactly_one_writer(
    open_store: Callable[..., FirestoreStateStore], clock: ManualClock
) -> None:
    a, b = open_store(), open_store()
    a.create(connection("c1"), due_state(T0 - S))
    stale = a.claim_due(T0, holder="stalled", ttl=TTL, limit=1).claims[0].lease
    current = b.claim_due(clock.set(T0 + TTL), holder="new", ttl=TTL, limit=1).claims[0].lease
    written = RefreshState(next_refresh_at=T0 + timedelta(hours=1), current_version=2)
    results = race(
        [partial(a.complete, [(stale, written)]), partial(b.complete, [(current, written)])]
    )
    assert results == [[False], [True]]


def _random_history(seed: int, store: StateStore, steps: int, clock: ManualClock) -> list[object]:
    """Apply one seeded random sequence of operations; return every answer. ``clock`` is the
    store's lease clock, moved with the history's time."""
    clock.set(T0)
    rnd = random.Random(seed)
    ids = [f"c{n}" for n in range(8)]
    leases: list[Lease] = []
    answers: list[object] = []
    now = T0
    for _ in range(steps):
        now = clock.set(now + rnd.choice([S, 10 * S, TTL]))
        ops = ["create", "create", "delete", "put", "due", "due", "claim", "complete", "park"]
        op = rnd.choice([*ops, "renew"])
        cid = rnd.choice(ids)
        state = due_state(
            now + rnd.choice([-30, -1, 0, 1, 30]) * S,
            status=rnd.choice([ConnectionStatus.ACTIVE] * 4 + [ConnectionStatus.DISABLED]),
            consecutive_failures=rnd.randrange(3),
        )
        try:
            if op == "create":
                store.create(connection(cid), state)
                answers.append(("created", cid))
            elif op == "delete":
                store.delete(cid)
                answers.append(("deleted", cid))
            elif op == "put":
                store.put_state(cid, state)
                answers.append(("put", cid))
            elif op == "due":
                batch = store.claim_due(now, holder="h", ttl=TTL, limit=rnd.randrange(4))
                leases.extend(c.lease for c in batch.claims)
                answers.append(batch)
            elif op == "claim":
                named = rnd.sample([*ids, "ghost"], 3)
                batch = store.claim(named, now, holder="op", ttl=TTL)
                leases.extend(c.lease for c in batch.claims)
                answers.append(batch)
            elif op == "renew":
                picked = rnd.sample(leases, min(len(leases), 3))
                answers.append(store.renew(picked, ttl=rnd.choice([TTL, 2 * TTL])))
            elif op == "park":
                n = rnd.randrange(8)  # the same event id now and then: parked once
                store.park_events([replace(event(cid, n=n), event_id=f"e{n}") for _ in range(2)])
                parked = store.parked_events(rnd.randrange(5))
                store.unpark_events([p.event_id for p in parked[:1]])
                answers.append(parked)
            elif leases:
                picked = rnd.sample(leases, min(len(leases), 2))
                if rnd.random() < 0.3:
                    store.release(picked[0])
                    answers.append(("released", picked[0]))
                else:
                    answers.append(store.complete([(lease, state) for lease in picked]))
        except (AlreadyExists, NotFound) as exc:
            answers.append(type(exc).__name__)
    answers += [store.list(), store.parked_events(1000)]
    return answers


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_random_history_gives_the_reference_adapters_answers(
    open_store: Callable[..., FirestoreStateStore], seed: int, clock: ManualClock
) -> None:
    expected = _random_history(seed, MemoryStateStore(clock), steps=120, clock=clock)
    assert _random_history(seed, open_store(chunk_size=2), steps=120, clock=clock) == expected


def test_parked_events_behave_like_the_reference(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    e = [event(f"c{n % 3}", n=n) for n in range(7)]
    answers = []
    for store in [open_store(chunk_size=2), MemoryStateStore()]:
        got = []
        store.park_events([e[0], e[1], e[0]])  # a duplicate within one call
        store.park_events([e[2], replace(e[1], version=99), e[3], e[4]])  # the first copy wins
        got += [store.parked_events(10), store.parked_events(2), store.parked_events(0)]
        store.unpark_events([e[1].event_id, "never-parked", e[1].event_id])
        store.park_events([e[1], e[5]])  # parked again after publishing: now the newest
        store.park_events([])
        store.unpark_events([])
        got.append(store.parked_events(10))
        answers.append(got)
    assert answers[0] == answers[1]
    assert answers[1][0] == e[:5]


def test_the_due_selection_bench_reports_its_figures() -> None:
    """bench/due_selection.py on a small registry (no timing asserted)."""
    emulator("firestore")  # skips here, with the reason, when the emulator is missing
    flags = ["--registered", "3000", "--due-fraction", "0.02", "--chunk-size", "25"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "due_selection.py"), *flags, "--json-only"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    required = {"registered", "due", "documents_read", "seconds", "seed_seconds", "claimed"}
    assert required <= set(figures)
    assert (figures["registered"], figures["due"], figures["claimed"]) == (3000, 60, 60)
    assert 60 <= figures["documents_read"] <= 120
    assert all(figures["checks"].values()), figures["checks"]


# --- errors --------------------------------------------------------------------------------


class _FailingClient:
    """Stands in for the client: every read raises the given google exception."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def collection(self, _name: str) -> _FailingClient:
        return self

    def document(self, _cid: str) -> _FailingClient:
        return self

    def get(self) -> None:
        raise self.exc

    def stream(self) -> None:
        raise self.exc


def _google_errors() -> list[tuple[BaseException, type[Exception], bool]]:
    from google.api_core import exceptions as api

    return [
        (api.ServiceUnavailable("down"), StoreUnavailable, True),
        (api.DeadlineExceeded("slow"), StoreUnavailable, True),
        (api.InternalServerError("oops"), StoreUnavailable, True),
        (api.Aborted("contention"), StoreUnavailable, True),
        (api.FailedPrecondition("The query requires an index"), ConfigError, False),
        (api.PermissionDenied("no"), ConfigError, False),
        (api.InvalidArgument("bad"), StoreUnavailable, False),
    ]


@pytest.mark.parametrize("case", range(7))
def test_google_errors_never_escape(case: int) -> None:
    raised, expected, retryable = _google_errors()[case]
    store = FirestoreStateStore(_FailingClient(raised))
    for call in (lambda: store.get("c1"), store.list):
        with pytest.raises(expected) as info:
            call()
        assert info.value.retryable is retryable
        assert info.value.__cause__ is raised


# --- shards --------------------------------------------------------------------------------


def _legacy(store: FirestoreStateStore, cid: str) -> None:
    """A record as written before the ``slot`` and ``bucket`` fields existed."""
    store.create(connection(cid), due_state(T0 - S))
    store._doc(cid).update({"slot": firestore_delete(), "bucket": firestore_delete()})


def firestore_delete() -> Any:
    from google.cloud import firestore

    return firestore.DELETE_FIELD


def test_the_slot_is_written_with_the_record(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    store = open_store()
    store.create(connection("c1"), due_state(T0))
    fields = store._doc("c1").get().to_dict()
    assert (fields["slot"], fields["bucket"]) == (slot_of("c1"), bucket_of(slot_of("c1")))


def test_records_without_a_slot_are_found_by_sharded_claims_once_prepared(
    open_store: Callable[..., FirestoreStateStore], clock: ManualClock
) -> None:
    """Upgrading to fan-out: records older than the field match no sharded query (a range
    filter skips a missing field), so a worker would never refresh them; ``prepare_shards``
    writes the slot alone and then every shard finds its own."""
    store = open_store()
    cids = [f"c{n:02d}" for n in range(12)]
    for cid in cids[:8]:
        _legacy(store, cid)
    for cid in cids[8:]:
        store.create(connection(cid), due_state(T0 - S))
    shards = [Shard(0, 2), Shard(1, 2)]
    before = {cid: store.get(cid) for cid in cids}
    seen: list[str] = []
    for shard in shards:  # the legacy ones are invisible to sharded claims
        seen += _ids(store.claim_due(T0, holder="w", ttl=TTL, limit=100, shard=shard))
    assert sorted(seen) == cids[8:]
    assert store.prepare_shards() == 8
    assert {cid: store.get(cid) for cid in cids} == before  # only the slot was written
    clock.set(T0 + 2 * TTL)  # the first claims' leases have expired
    taken = []
    for shard in shards:
        batch = store.claim_due(T0, holder="w", ttl=TTL, limit=100, shard=shard)
        assert all(shard.holds(cid) for cid in _ids(batch))
        taken += _ids(batch)
    assert sorted(taken) == cids
    # Nothing left to do: two count aggregations, no document read, nothing written.
    reads, aggregations = store.documents_read, store.aggregations_run
    assert store.prepare_shards() == 0
    assert (store.documents_read - reads, store.aggregations_run - aggregations) == (0, 2)


def test_a_big_backfill_is_finished_over_several_calls(
    open_store: Callable[..., FirestoreStateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each call writes for at most ``PREPARE_SECONDS`` (here none: one commit's worth), so
    a scheduled call is never held up for long by a large collection of older records; the
    next calls finish it."""
    store = open_store()
    for start in range(0, 600, 300):
        batch = store.client.batch()
        for n in range(start, start + 300):
            fields = stored_document(connection(f"c{n:04d}"), due_state(T0 - S))
            del fields["slot"], fields["bucket"]
            batch.set(store._doc(f"c{n:04d}"), fields)
        batch.commit()
    monkeypatch.setattr(FirestoreStateStore, "PREPARE_SECONDS", 0.0)
    assert store.prepare_shards() == 450
    assert store.prepare_shards() == 150
    assert store.prepare_shards() == 0
    taken = []
    for index in range(3):
        shard = Shard(index, 3)
        taken += _ids(store.claim_due(T0, holder="w", ttl=TTL, limit=1000, shard=shard))
    assert len(taken) == len(set(taken)) == 600


def test_prepare_shards_leaves_a_record_deleted_meanwhile_deleted(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    """The batch of slot writes is all or nothing; one record gone falls back to writing one
    by one, and the deleted one is not brought back as a slot-only document."""
    store = open_store()
    for cid in ("a", "b", "c"):
        _legacy(store, cid)
    store.delete("b")  # after the scan would have listed it: write its slot directly
    store._write_slots(["a", "b", "c"])
    assert not store._doc("b").get().exists
    assert [store._doc(cid).get().to_dict()["slot"] for cid in ("a", "c")] == [
        slot_of("a"),
        slot_of("c"),
    ]


# --- the shipped index definition ----------------------------------------------------------


def _index_needed(query: Any) -> tuple[frozenset[str], list[str]]:
    """What a composite index must hold for ``query``: its equality fields (in any order),
    then its explicit order, then the remaining inequality fields in lexicographic order, the
    order Firestore applies (StructuredQuery ``orderBy``)."""
    pb = query._to_protobuf()
    filters = [f.field_filter for f in pb.where.composite_filter.filters]
    # An IN is a disjunction of equalities: each disjunct runs on the index as an equality.
    equal = frozenset(f.field.field_path for f in filters if f.op.name in {"EQUAL", "IN"})
    ordered = [o.field.field_path for o in pb.order_by]
    ranged = {f.field.field_path for f in filters if f.op.name not in {"EQUAL", "IN"}}
    return equal, ordered + sorted(ranged - set(ordered))


def _serves(fields: list[str], need: tuple[frozenset[str], list[str]]) -> bool:
    equal, ordered = need
    return set(fields[: len(equal)]) == equal and fields[len(equal) :] == ordered


def test_the_terraform_defines_an_index_for_every_query_the_adapter_runs(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    """The emulator does not enforce composite indexes; this checks that the Terraform
    (``google_firestore_index`` in terraform/modules/tokenbroker) holds one for each query, so
    production never answers FAILED_PRECONDITION, and nothing unused."""
    module = hcl.load(hcl.MODULE)
    assert module.variables["firestore_collection"]["default"] == DEFAULT_COLLECTION
    indexes = []
    for index in module.of_type("google_firestore_index"):
        assert index.body["collection"] == "${var.firestore_collection}"
        assert index.body["query_scope"] == "COLLECTION"
        assert all(f["order"] == "ASCENDING" for f in index.body["fields"])
        indexes.append([f["field_path"] for f in index.body["fields"]])
    assert indexes
    needs = [_index_needed(q) for q in open_store().queries(T0)]
    for need in needs:
        assert any(_serves(fields, need) for fields in indexes), need
    for fields in indexes:
        assert any(_serves(fields, need) for need in needs), fields


# --- token-endpoint budgets ----------------------------------------------------------------

WINDOW = timedelta(minutes=10)


def _budget_doc(store: FirestoreStateStore, key: str) -> Any:
    return store._budget(key)


def test_a_budget_is_one_document_and_a_denial_reads_it_and_writes_nothing(
    open_store: Callable[..., FirestoreStateStore],
) -> None:
    store = open_store()
    for n in range(2):
        assert store.take_budget("zoho:k", limit=2, window=WINDOW, now=T0 + n * S).granted
    doc = _budget_doc(store, "zoho:k").get().to_dict()
    assert doc["key"] == "zoho:k"
    assert [t["cost"] for t in doc["takes"]] == [1, 1]
    assert doc["takes"][1]["at"] - doc["takes"][0]["at"] == 1_000_000  # microseconds
    # The TTL field: the last take's end, plus the grace a lagging host may still need.
    assert doc["expires_at"] == T0 + S + WINDOW + timedelta(hours=1)
    reads, transactions = store.documents_read, store.transactions_run
    assert not store.take_budget("zoho:k", limit=2, window=WINDOW, now=T0 + 2 * S).granted
    assert (store.documents_read - reads, store.transactions_run - transactions) == (1, 1)
    assert _budget_doc(store, "zoho:k").get().to_dict() == doc


@pytest.mark.parametrize(
    "tampered",
    [
        {"key": "someone-else"},
        {"takes": "ten"},
        {"takes": [{"at": "1", "cost": 1}]},
        {"takes": [{"at": 1}]},
        {"takes": [{"at": 1, "cost": 0}]},
        {"takes": [{"when": 1, "cost": 1}]},
        {"takes": [7]},
    ],
)
def test_a_tampered_budget_document_is_refused_not_guessed_at(
    open_store: Callable[..., FirestoreStateStore], tampered: dict[str, Any]
) -> None:
    store = open_store()
    store.take_budget("k", limit=5, window=WINDOW, now=T0)
    _budget_doc(store, "k").update(tampered)
    with pytest.raises(ConfigError, match="budget 'k'"):
        store.take_budget("k", limit=5, window=WINDOW, now=T0)
