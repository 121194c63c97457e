"""Secret Manager's pointer protocol (:mod:`tokenbroker.adapters.gcp.secret_manager_pointed`,
docs/gcp.md) on the gRPC test server, beyond the port contract: what a refresh costs in calls,
and the crash leftovers the protocol must read through -- staged chains, a loser's version on
top, gaps -- without ever losing a rotated refresh token or destroying the version readers use.

The pointers live in a real :class:`~tokenbroker.adapters.memory.MemoryStateStore` record (the
Firestore one has the same contract: tests/contract/test_version_pointers.py), and commits go
through the refresher's own :class:`~tokenbroker.refresh.commit.PointerCommitter`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.contract.builders import connection
from tests.support.secretmanager_server import SecretManagerTestServer
from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore
from tokenbroker.adapters.memory import MemoryStateStore
from tokenbroker.kernel.errors import StoreUnavailable, VersionConflict
from tokenbroker.kernel.model import ConnectionStatus, Credential, RefreshState
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import Completion, Promotion, SecretWrite
from tokenbroker.refresh.commit import PointerCommitter, committer_for

pytestmark = pytest.mark.system
T0 = datetime(2026, 6, 1, tzinfo=UTC)
TTL = timedelta(seconds=60)
WRITES = ("AddSecretVersion", "DestroySecretVersion", "DisableSecretVersion", "UpdateSecret")


@pytest.fixture(scope="module")
def server() -> Iterator[SecretManagerTestServer]:
    with SecretManagerTestServer().start() as running:
        yield running


def credential(n: int) -> Credential:
    obtained = T0 + timedelta(seconds=1800 * n)
    return Credential(
        refresh_token=Secret(f"rt-{n}"),
        access_token=Secret(f"at-{n}"),
        obtained_at=obtained,
        expires_at=obtained + timedelta(seconds=3600),
    )


class Rig:
    """A state store holding the record (and so the pointer) and handles on one project."""

    def __init__(self, server: SecretManagerTestServer) -> None:
        self.server = server
        self.project = f"p-{uuid.uuid4().hex[:8]}"
        self.state = MemoryStateStore()

    def handle(self) -> PointedSecretManagerStore:
        """Another process's store: its own client and its own memory of what it read."""
        return PointedSecretManagerStore(
            self.server.client(), project=self.project, retained_versions=3, pointers=self.state
        )

    def register(self, cid: str = "c1") -> PointedSecretManagerStore:
        """What the registry does: the record first (no version), then the first version."""
        self.state.create(connection(cid), RefreshState(status=ConnectionStatus.ACTIVE))
        store = self.handle()
        assert store.put(cid, credential(0), expected_version=None) == 1
        return store

    def pointer(self, cid: str = "c1") -> int | None:
        return self.state.get(cid).state.current_version

    def states(self, store: PointedSecretManagerStore, cid: str = "c1") -> dict[int, str]:
        listed = self.server.client().list_secret_versions(
            request={"parent": store.secret_name(cid)}
        )
        return {int(v.name.rsplit("/", 1)[1]): v.state.name for v in listed}

    def refresh(self, store: PointedSecretManagerStore, n: int, cid: str = "c1") -> int:
        """One refresh as the tick runs it: claim (the record carries the pointer), read with
        that pointer, stage the answer, then the fenced state commit that moves the pointer,
        then retirement (PointerCommitter)."""
        now = datetime.now(UTC)
        self.state.put_state(cid, RefreshState(status=ConnectionStatus.ACTIVE,
                             current_version=self.pointer(cid), next_refresh_at=now))  # fmt: skip
        (claim,) = self.state.claim([cid], now, holder="tick", ttl=TTL).claims
        pointer = claim.record.state.current_version
        read = store.get_many([cid], pointers={cid: pointer})[cid]
        assert not isinstance(read, BaseException), read
        (staged,) = store.stage([SecretWrite(cid, credential(n), read.version, attempt=f"a{n}")])
        assert isinstance(staged, int), staged
        written = RefreshState(status=ConnectionStatus.ACTIVE, current_version=staged)
        committer = committer_for(store, self.state)
        assert isinstance(committer, PointerCommitter)
        (outcome,) = committer.commit(
            [(Completion(claim.lease, written), Promotion(cid, staged, read.version))]
        )
        assert outcome.name == "COMMITTED", outcome
        return staged


def _writes(calls: dict[str, int]) -> int:
    return sum(calls.get(m, 0) for m in WRITES)


def test_a_steady_state_refresh_costs_one_access_no_read_and_two_writes(
    server: SecretManagerTestServer,
) -> None:
    """Issue 13's floor: 0 GetSecret, 1 AccessSecretVersion, <= 2 writes, nothing listed."""
    rig = Rig(server)
    store = rig.register()
    for n in range(1, 4):  # to version 4: retention (3) destroys from now on
        rig.refresh(store, n)
    for n in range(4, 8):
        server.reset_calls()
        version = rig.refresh(store, n)
        calls = server.calls
        assert calls["GetSecret"] == 0, calls
        assert calls["AccessSecretVersion"] == 1, calls
        assert calls["AddSecretVersion"] == 1, calls
        assert calls["DestroySecretVersion"] == 1, calls
        assert _writes(calls) == 2, calls
        assert calls["ListSecretVersions"] == 0, calls
        assert rig.pointer() == version
    # The current version and the two before it readable; every older one destroyed.
    assert rig.states(store) == {
        **dict.fromkeys(range(1, 6), "DESTROYED"),
        6: "ENABLED",
        7: "ENABLED",
        8: "ENABLED",
    }
    assert store.versions("c1") == [6, 7, 8]


def test_a_second_process_refreshes_at_the_same_cost(server: SecretManagerTestServer) -> None:
    """A fresh handle (another instance) knows nothing but the pointer in the record: its
    read is still one access, and its write needs no extra read."""
    rig = Rig(server)
    rig.register()
    for n in range(1, 5):
        rig.refresh(rig.handle(), n)
    server.reset_calls()
    rig.refresh(rig.handle(), 5)
    calls = server.calls
    assert (calls["GetSecret"], calls["AccessSecretVersion"], _writes(calls)) == (0, 1, 2), calls


def test_reads_never_write(server: SecretManagerTestServer) -> None:
    """Readers (the issuer, the relay, a CLI) only access: even with a staged answer waiting
    above the pointer they read it and leave it for its writer or the next refresh."""
    rig = Rig(server)
    writer = rig.register()
    writer.stage([SecretWrite("c1", credential(1), 1, attempt="a1")])
    server.reset_calls()
    reader = rig.handle()
    assert reader.get("c1").credential.refresh_token == Secret("rt-1")
    assert reader.get_many(["c1"], pointers={"c1": 1})["c1"].version == 2  # type: ignore[union-attr]
    assert _writes(server.calls) == 0, server.calls
    assert rig.pointer() == 1


def test_a_first_version_whose_registration_died_before_the_pointer_moved_is_current(
    server: SecretManagerTestServer,
) -> None:
    rig = Rig(server)
    rig.state.create(connection("c1"), RefreshState(status=ConnectionStatus.ACTIVE))
    (staged,) = rig.handle().stage([SecretWrite("c1", credential(0), None, attempt="r")])
    assert staged == 1 and rig.pointer() is None
    assert rig.handle().get("c1").credential.refresh_token == Secret("rt-0")


def test_a_two_deep_chain_of_crashed_writers_is_read_through_and_kept(
    server: SecretManagerTestServer,
) -> None:
    """Two refreshers die in a row after staging, each on the previous one's answer (the
    provider rotated the refresh token both times): readers see the newest, the next refresh
    builds on it, and its commit is accepted from the old pointer through the chain."""
    rig = Rig(server)
    rig.register()
    first = rig.handle()
    (v2,) = first.stage([SecretWrite("c1", credential(1), 1, attempt="a1")])  # then dies
    second = rig.handle()
    assert second.get("c1").version == v2
    (v3,) = second.stage([SecretWrite("c1", credential(2), v2, attempt="a2")])  # dies too
    assert rig.pointer() == 1
    third = rig.handle()
    current = third.get_many(["c1"], pointers={"c1": 1})["c1"]
    assert not isinstance(current, BaseException)
    assert (current.version, current.credential.refresh_token) == (v3, Secret("rt-2"))
    v4 = rig.refresh(third, 3)
    assert rig.pointer() == v4
    assert rig.handle().get("c1").credential.refresh_token == Secret("rt-3")
    # Retention: v4 and the two it stands on stay readable; v1 goes.
    states = rig.states(third)
    assert {v: states[v] for v in (v2, v3, v4)} == dict.fromkeys((v2, v3, v4), "ENABLED")
    assert states[1] == "DESTROYED"


def test_a_losers_version_left_on_top_is_read_past_and_swept(
    server: SecretManagerTestServer,
) -> None:
    """A stale writer staged on version 1 after the pointer had moved to 2, and died before
    it could abandon: ``latest`` is its leftover. Readers get version 2 (the pointer's), the
    next refresh builds on 2, and its promotion, seeing the gap, sweeps the leftover away."""
    rig = Rig(server)
    stale = rig.register()
    stale.get("c1")  # it read version 1 ...
    v2 = rig.refresh(rig.handle(), 1)  # ... another instance refreshed meanwhile ...
    (v3,) = stale.stage([SecretWrite("c1", credential(9), 1, attempt="stale")])  # ... stale
    assert (v2, v3) == (2, 3)
    reader = rig.handle()
    got = reader.get("c1")
    assert (got.version, got.credential.refresh_token) == (2, Secret("rt-1"))
    v4 = rig.refresh(reader, 2)
    assert rig.states(reader)[v3] == "DESTROYED"
    assert rig.handle().get("c1").version == v4 == rig.pointer()


def test_a_stale_writer_is_refused_and_its_version_destroyed(
    server: SecretManagerTestServer,
) -> None:
    """A write on a version that is no longer current (an operator's handle that read before a
    refresh) loses the compare-and-set; the winner's refresh token stays current."""
    rig = Rig(server)
    operator = rig.register()
    operator.get("c1")
    rig.refresh(rig.handle(), 1)
    with pytest.raises(VersionConflict):
        operator.put("c1", credential(5), expected_version=1)
    assert rig.pointer() == 2
    assert rig.handle().get("c1").credential.refresh_token == Secret("rt-1")
    assert rig.states(operator).get(3) == "DESTROYED"


def test_a_commit_refused_by_the_state_store_keeps_a_version_others_built_on(
    server: SecretManagerTestServer,
) -> None:
    """A refresher paused past its lease commits too late: its staged answer (a rotated
    refresh token) was already read and built on by the next holder, so abandoning it must
    not destroy it; the next holder's version stays current."""
    rig = Rig(server)
    paused = rig.register()
    now = datetime.now(UTC)
    rig.state.put_state("c1", RefreshState(status=ConnectionStatus.ACTIVE, current_version=1,
                        next_refresh_at=now))  # fmt: skip
    (claim,) = rig.state.claim(["c1"], now, holder="paused", ttl=timedelta(seconds=0)).claims
    (v2,) = paused.stage([SecretWrite("c1", credential(1), 1, attempt="a1")])
    v3 = rig.refresh(rig.handle(), 2)  # took the expired lease, read v2, built on it
    assert rig.states(paused)[v2] == "ENABLED"
    written = RefreshState(status=ConnectionStatus.ACTIVE, current_version=v2)
    (outcome,) = PointerCommitter(paused, rig.state).commit(
        [(Completion(claim.lease, written), Promotion("c1", v2, 1))]
    )
    assert outcome.name == "LEASE_LOST"
    assert rig.pointer() == v3
    assert rig.states(paused)[v2] == "ENABLED"  # kept with v3
    assert rig.handle().get("c1").credential.refresh_token == Secret("rt-2")


class CancelledOnce:
    """The real client, except the first AddSecretVersion is cut off as a server that stops
    mid-call cuts it (gRPC CANCELLED: the write may or may not have landed)."""

    def __init__(self, real: object, *, landed: bool) -> None:
        self._real = real
        self.landed = landed
        self.cut = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def add_secret_version(self, request: object) -> object:
        from google.api_core import exceptions

        if not self.cut:
            self.cut += 1
            if self.landed:
                self._real.add_secret_version(request=request)  # type: ignore[attr-defined]
            raise exceptions.Cancelled("the server stopped mid-call")
        return self._real.add_secret_version(request=request)  # type: ignore[attr-defined]


@pytest.mark.parametrize("landed", [False, True])
def test_a_stage_cut_off_by_a_stopping_server_is_retried_and_keeps_the_answer(
    server: SecretManagerTestServer, landed: bool
) -> None:
    """Found by the fault suite (Secret Manager stopped mid-tick): a write the server cut off
    (CANCELLED -- our client never cancels its own calls) was a non-retryable error, so the
    answer in hand, a rotated refresh token, was dropped. It is retryable: the tick's retry
    stages it again, and a copy that had landed is swept by the promotion."""
    rig = Rig(server)
    rig.register()
    flaky = CancelledOnce(server.client(), landed=landed)
    store = PointedSecretManagerStore(
        flaky, project=rig.project, retained_versions=3, pointers=rig.state
    )
    store.get("c1")
    write = SecretWrite("c1", credential(1), 1, attempt="a1")
    with pytest.raises(StoreUnavailable) as cut:
        store.stage([write])
    assert cut.value.retryable  # so the tick's answer_retry stages it again:
    (staged,) = store.stage([write])
    assert isinstance(staged, int)
    now = datetime.now(UTC)
    (claim,) = rig.state.claim(["c1"], now, holder="tick", ttl=TTL).claims
    written = RefreshState(status=ConnectionStatus.ACTIVE, current_version=staged)
    (outcome,) = PointerCommitter(store, rig.state).commit(
        [(Completion(claim.lease, written), Promotion("c1", staged, 1))]
    )
    assert outcome.name == "COMMITTED"
    assert rig.handle().get("c1").credential.refresh_token == Secret("rt-1")
    if landed:  # the copy that landed (version 2) is swept: a gap below the promoted one
        assert rig.states(store)[2] == "DESTROYED"
