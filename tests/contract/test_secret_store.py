"""The SecretStore contract (tokenbroker.ports.SecretStore), for every adapter in the registry."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import pytest

from tokenbroker.kernel.errors import ConfigError, CorruptCredential, NotFound, VersionConflict
from tokenbroker.kernel.model import Credential, StoredCredential
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import Promotion, SecretStore, SecretWrite

from .builders import credential, full_credential
from .racing import race

OpenSecretStore = Callable[..., SecretStore]


def _put_chain(store: SecretStore, cid: str, count: int) -> list[Credential]:
    """``count`` successive versions of ``cid``; returns the credentials by version - 1."""
    creds = []
    expected: int | None = None
    for n in range(count):
        cred = credential(cid)
        version = store.put(cid, cred, expected_version=expected)
        assert version == n + 1
        expected = version
        creds.append(cred)
    return creds


def _assert_untouched(store: SecretStore, cid: str, versions: list[int], current: Credential):
    assert store.versions(cid) == versions
    got = store.get(cid)
    assert got.version == versions[-1]
    assert got.credential == current


# --- reads on nothing ----------------------------------------------------------------------


def test_reads_of_an_unknown_connection(secret_store: SecretStore) -> None:
    with pytest.raises(NotFound):
        secret_store.get("nope")
    assert secret_store.versions("nope") == []
    assert secret_store.get_many(["nope"]) == {}
    assert secret_store.get_many([]) == {}


# --- put / compare-and-set -----------------------------------------------------------------


def test_put_with_no_expected_version_creates_version_1(secret_store: SecretStore) -> None:
    cred = credential()
    assert secret_store.put("c1", cred, expected_version=None) == 1
    got = secret_store.get("c1")
    assert isinstance(got, StoredCredential)
    assert (got.connection_id, got.version, got.credential) == ("c1", 1, cred)
    assert secret_store.versions("c1") == [1]


def test_create_when_one_exists_conflicts_and_writes_nothing(secret_store: SecretStore) -> None:
    first = credential()
    secret_store.put("c1", first, expected_version=None)
    with pytest.raises(VersionConflict):
        secret_store.put("c1", credential(), expected_version=None)
    _assert_untouched(secret_store, "c1", [1], first)


@pytest.mark.parametrize("expected", [0, 1, 2])
def test_cas_on_a_missing_connection_conflicts_and_creates_nothing(
    secret_store: SecretStore, expected: int
) -> None:
    with pytest.raises(VersionConflict):
        secret_store.put("c1", credential(), expected_version=expected)
    assert secret_store.versions("c1") == []
    with pytest.raises(NotFound):
        secret_store.get("c1")


@pytest.mark.parametrize("expected", [1, 3, 4, 99])
def test_cas_with_a_wrong_expected_version_conflicts_and_writes_nothing(
    secret_store: SecretStore, expected: int
) -> None:
    creds = _put_chain(secret_store, "c1", 2)
    with pytest.raises(VersionConflict):
        secret_store.put("c1", credential(), expected_version=expected)
    _assert_untouched(secret_store, "c1", [1, 2], creds[-1])


def test_versions_count_up_and_get_returns_the_newest(secret_store: SecretStore) -> None:
    creds = _put_chain(secret_store, "c1", 3)
    assert secret_store.versions("c1") == [1, 2, 3]
    got = secret_store.get("c1")
    assert (got.version, got.credential) == (3, creds[2])


def test_connections_have_independent_version_sequences(secret_store: SecretStore) -> None:
    _put_chain(secret_store, "a", 3)
    b = credential()
    assert secret_store.put("b", b, expected_version=None) == 1
    assert secret_store.versions("b") == [1]
    assert secret_store.versions("a") == [1, 2, 3]


# --- retention -----------------------------------------------------------------------------


def test_default_retention_keeps_the_newest_three(secret_store: SecretStore) -> None:
    creds = _put_chain(secret_store, "c1", 6)
    assert secret_store.versions("c1") == [4, 5, 6]
    got = secret_store.get("c1")
    assert (got.version, got.credential) == (6, creds[5])


@pytest.mark.parametrize("retained", [1, 2, 5])
def test_retention_keeps_exactly_the_newest_n(
    open_secret_store: OpenSecretStore, retained: int
) -> None:
    store = open_secret_store(retained_versions=retained)
    creds: list[Credential] = []
    for n in range(1, retained + 4):
        creds.append(credential())
        store.put("c1", creds[-1], expected_version=n - 1 if n > 1 else None)
        newest = list(range(max(1, n - retained + 1), n + 1))
        assert store.versions("c1") == newest
        got = store.get("c1")
        assert (got.version, got.credential) == (n, creds[-1])


@pytest.mark.parametrize("retained", [0, -1])
def test_a_retention_below_one_version_is_refused(
    open_secret_store: OpenSecretStore, retained: int
) -> None:
    with pytest.raises(ConfigError):
        open_secret_store(retained_versions=retained)


# --- batch operations ----------------------------------------------------------------------


def test_get_many_returns_the_current_of_each_and_omits_missing(
    secret_store: SecretStore,
) -> None:
    a = _put_chain(secret_store, "a", 2)
    b = _put_chain(secret_store, "b", 1)
    got = secret_store.get_many(["a", "missing", "b", "a"])
    assert set(got) == {"a", "b"}
    ga, gb = got["a"], got["b"]
    assert isinstance(ga, StoredCredential) and isinstance(gb, StoredCredential)
    assert (ga.connection_id, ga.version, ga.credential) == ("a", 2, a[1])
    assert (gb.connection_id, gb.version, gb.credential) == ("b", 1, b[0])


def test_get_many_handles_many_ids(secret_store: SecretStore) -> None:
    ids = [f"c{n:04d}" for n in range(600)]  # more than one SQL chunk of parameters
    writes = [SecretWrite(cid, credential(cid), None) for cid in ids[::2]]
    assert secret_store.put_many(writes) == [1] * len(writes)
    got = secret_store.get_many(ids)
    assert sorted(got) == ids[::2]
    assert all(got[w.connection_id].credential == w.credential for w in writes)


def test_get_many_returns_a_bad_record_as_that_connections_value(
    secret_store: SecretStore, corrupt_secret: Callable[[SecretStore, str], None]
) -> None:
    """One record that does not verify or decrypt is that connection's CorruptCredential;
    the others read as usual (issue 8: one bad record failed a whole tick)."""
    good = _put_chain(secret_store, "good", 1)
    _put_chain(secret_store, "bad", 2)
    corrupt_secret(secret_store, "bad")
    got = secret_store.get_many(["good", "bad", "missing"])
    assert set(got) == {"good", "bad"}
    assert isinstance(got["bad"], CorruptCredential)
    assert not got["bad"].retryable
    ok = got["good"]
    assert isinstance(ok, StoredCredential) and ok.credential == good[0]
    with pytest.raises(CorruptCredential):
        secret_store.get("bad")


def test_put_many_returns_one_result_per_write_and_a_conflict_stops_nothing(
    secret_store: SecretStore,
) -> None:
    existing = _put_chain(secret_store, "b", 2)
    writes = [
        SecretWrite("a", credential("a"), None),  # create: ok
        SecretWrite("b", credential("b"), 1),  # stale: conflict
        SecretWrite("c", credential("c"), 5),  # missing with a version: conflict
        SecretWrite("d", credential("d"), None),  # create: ok, after two conflicts
    ]
    results = secret_store.put_many(writes)
    assert len(results) == 4
    assert results[0] == 1
    assert isinstance(results[1], VersionConflict)
    assert isinstance(results[2], VersionConflict)
    assert results[3] == 1
    assert secret_store.get("a").credential == writes[0].credential
    assert secret_store.get("d").credential == writes[3].credential
    _assert_untouched(secret_store, "b", [1, 2], existing[1])
    assert secret_store.versions("c") == []


def test_put_many_writes_to_one_connection_in_the_order_given(
    secret_store: SecretStore,
) -> None:
    """A later write in the batch may expect the version an earlier one makes; a stale one
    after them still conflicts."""
    creds = [credential(f"a{n}") for n in range(3)]
    writes = [
        SecretWrite("a", creds[0], None),
        SecretWrite("b", credential("b"), None),
        SecretWrite("a", creds[1], 1),
        SecretWrite("a", creds[2], 2),
        SecretWrite("a", credential("stale"), 1),
    ]
    results = secret_store.put_many(writes)
    assert results[:4] == [1, 1, 2, 3]
    assert isinstance(results[4], VersionConflict)
    got = secret_store.get("a")
    assert (got.version, got.credential) == (3, creds[2])
    assert secret_store.versions("a") == [1, 2, 3]


def test_put_many_of_nothing(secret_store: SecretStore) -> None:
    assert secret_store.put_many([]) == []


def test_put_many_advances_existing_connections(secret_store: SecretStore) -> None:
    _put_chain(secret_store, "a", 1)
    _put_chain(secret_store, "b", 3)
    new_a, new_b = credential("a"), credential("b")
    results = secret_store.put_many([SecretWrite("a", new_a, 1), SecretWrite("b", new_b, 3)])
    assert results == [2, 4]
    assert secret_store.get("a").credential == new_a
    assert secret_store.get("b").credential == new_b
    assert secret_store.versions("b") == [2, 3, 4]  # retention applies to batch writes too


# --- delete --------------------------------------------------------------------------------


def test_delete_destroys_every_version(secret_store: SecretStore) -> None:
    _put_chain(secret_store, "c1", 3)
    other = credential()
    secret_store.put("other", other, expected_version=None)
    secret_store.delete("c1")
    with pytest.raises(NotFound):
        secret_store.get("c1")
    assert secret_store.versions("c1") == []
    assert secret_store.get_many(["c1", "other"]).keys() == {"other"}
    with pytest.raises(NotFound):
        secret_store.delete("c1")
    assert secret_store.get("other").credential == other


def test_delete_of_an_unknown_connection_is_not_found(secret_store: SecretStore) -> None:
    with pytest.raises(NotFound):
        secret_store.delete("nope")


def test_a_deleted_connection_can_be_created_again(secret_store: SecretStore) -> None:
    _put_chain(secret_store, "c1", 2)
    secret_store.delete("c1")
    with pytest.raises(VersionConflict):  # the old version is gone: CAS on it fails
        secret_store.put("c1", credential(), expected_version=2)
    fresh = credential()
    version = secret_store.put("c1", fresh, expected_version=None)
    got = secret_store.get("c1")
    assert (got.version, got.credential) == (version, fresh)
    assert secret_store.versions("c1") == [version]


# --- the credential itself -----------------------------------------------------------------


def test_credential_round_trip_preserves_every_field(secret_store: SecretStore) -> None:
    cred = full_credential()
    secret_store.put("c1", cred, expected_version=None)
    for got in (
        secret_store.get("c1").credential,
        secret_store.get_many(["c1"])["c1"].credential,
    ):
        assert got == cred
        for name in ("access_token", "refresh_token", "client_secret", "private_key"):
            value = getattr(got, name)
            assert isinstance(value, Secret)
            assert value.reveal() == getattr(cred, name).reveal()
        assert got.token_type == "DPoP"
        assert got.scope == cred.scope
        assert isinstance(got.scope, tuple)
        assert got.expires_at == cred.expires_at
        assert got.obtained_at == cred.obtained_at
        assert got.expires_at is not None and got.expires_at.tzinfo is not None
        assert got.obtained_at is not None and got.obtained_at.tzinfo is not None
        assert dict(got.metadata) == dict(cred.metadata)


def test_minimal_credential_round_trip_keeps_absent_fields_absent(
    secret_store: SecretStore,
) -> None:
    cred = Credential(access_token=Secret("only-this"))
    secret_store.put("c1", cred, expected_version=None)
    got = secret_store.get("c1").credential
    assert got == cred
    assert got.refresh_token is None and got.client_secret is None and got.private_key is None
    assert got.expires_at is None and got.obtained_at is None
    assert got.scope == () and dict(got.metadata) == {}
    assert got.token_type == "Bearer"


def test_sub_second_timestamps_are_kept_to_the_second_and_never_moved_later(
    secret_store: SecretStore,
) -> None:
    """Adapters that serialise (Credential.to_plaintext) keep whole seconds. An expiry may move
    earlier by under a second, never later, so a stored token is never trusted for longer."""
    expires = datetime(2026, 1, 1, 13, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=-5)))
    obtained = datetime(2026, 1, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    cred = Credential(access_token=Secret("x"), expires_at=expires, obtained_at=obtained)
    secret_store.put("c1", cred, expected_version=None)
    got = secret_store.get("c1").credential
    assert got.expires_at is not None and got.obtained_at is not None
    assert timedelta(0) <= expires - got.expires_at < timedelta(seconds=1)
    assert timedelta(0) <= obtained - got.obtained_at < timedelta(seconds=1)


# --- several handles, several threads ------------------------------------------------------


def test_writes_are_visible_through_another_handle(open_secret_store: OpenSecretStore) -> None:
    writer, reader = open_secret_store(), open_secret_store()
    cred = credential()
    writer.put("c1", cred, expected_version=None)
    assert reader.get("c1").credential == cred
    with pytest.raises(VersionConflict):
        reader.put("c1", credential(), expected_version=None)
    reader.delete("c1")
    with pytest.raises(NotFound):
        writer.get("c1")


@pytest.mark.parametrize("handles", ["one-handle", "a-handle-each"])
def test_exactly_one_of_racing_cas_writes_wins(
    open_secret_store: OpenSecretStore, handles: str
) -> None:
    racers, rounds = 8, 5
    first = open_secret_store()
    first.put("c1", credential(), expected_version=None)
    stores = [first if handles == "one-handle" else open_secret_store() for _ in range(racers)]
    # Version numbers only promise to grow: a store such as Secret Manager assigns numbers as
    # versions are added, and a losing racer's version is destroyed, leaving a gap.
    current = 1
    for _ in range(rounds):
        creds = [credential(f"racer{n}") for n in range(racers)]
        results = race(
            [
                partial(stores[n].put, "c1", creds[n], expected_version=current)
                for n in range(racers)
            ]
        )
        winners = [n for n, r in enumerate(results) if isinstance(r, int)]
        losers = [n for n, r in enumerate(results) if isinstance(r, VersionConflict)]
        assert len(winners) == 1, results
        assert len(losers) == racers - 1, results
        won = results[winners[0]]
        assert isinstance(won, int)
        assert won > current
        assert first.versions("c1")[-1] == won
        assert first.get("c1").version == won
        assert first.get("c1").credential == creds[winners[0]]
        current = won


# --- staged (pending) versions ---------------------------------------------------------------


def test_a_staged_version_is_durable_and_settled_by_the_next_read(
    open_secret_store: OpenSecretStore,
) -> None:
    """The refresher stages a provider's answer the moment it arrives and may die before
    promoting it: whoever reads next finds it current (issue 8: Secret Manager's orphan)."""
    writer = open_secret_store()
    first = _put_chain(writer, "c1", 1)[0]
    answer = credential("answer")
    (staged,) = writer.stage([SecretWrite("c1", answer, 1, attempt="a1")])
    assert isinstance(staged, int) and staged > 1
    reader = open_secret_store()  # another process: the writer is gone
    got = reader.get("c1")
    assert (got.version, got.credential) == (staged, answer)
    assert reader.versions("c1")[-1] == staged
    assert first != answer


def test_get_many_settles_staged_versions_too(open_secret_store: OpenSecretStore) -> None:
    writer = open_secret_store()
    _put_chain(writer, "a", 1)
    _put_chain(writer, "b", 2)
    answers = {"a": credential("a"), "b": credential("b")}
    staged = writer.stage(
        [SecretWrite("a", answers["a"], 1, "x"), SecretWrite("b", answers["b"], 2, "y")]
    )
    got = open_secret_store().get_many(["a", "b"])
    for (cid, answer), version in zip(answers.items(), staged, strict=True):
        value = got[cid]
        assert isinstance(value, StoredCredential)
        assert (value.version, value.credential) == (version, answer)


def test_promote_makes_a_staged_version_current_once(secret_store: SecretStore) -> None:
    _put_chain(secret_store, "c1", 2)
    answer = credential("answer")
    (staged,) = secret_store.stage([SecretWrite("c1", answer, 2, attempt="a1")])
    assert isinstance(staged, int)
    assert secret_store.promote([Promotion("c1", staged, 2)]) == [staged]
    assert secret_store.promote([Promotion("c1", staged, 2)]) == [staged]  # already current
    got = secret_store.get("c1")
    assert (got.version, got.credential) == (staged, answer)
    assert staged in secret_store.versions("c1")


def test_staging_on_a_version_that_is_not_current_conflicts_and_writes_nothing(
    secret_store: SecretStore,
) -> None:
    creds = _put_chain(secret_store, "c1", 2)
    results = secret_store.stage(
        [
            SecretWrite("c1", credential("stale"), 1, attempt="old"),
            SecretWrite("missing", credential("m"), 3, attempt="m"),
            SecretWrite("fresh", credential("f"), None, attempt="f"),
        ]
    )
    assert isinstance(results[0], VersionConflict)
    assert isinstance(results[1], VersionConflict)
    assert isinstance(results[2], int)
    _assert_untouched(secret_store, "c1", [1, 2], creds[1])
    assert secret_store.versions("missing") == []
    assert secret_store.get("fresh").version == results[2]


def test_a_staged_version_and_a_competing_write_never_both_become_current(
    secret_store: SecretStore,
) -> None:
    """An operator re-authorises while a refresh's answer is staged on the same version:
    one of the two wins, the other is never current (and its promotion says so)."""
    _put_chain(secret_store, "c1", 1)
    answer, operator = credential("answer"), credential("operator")
    (staged,) = secret_store.stage([SecretWrite("c1", answer, 1, attempt="a1")])
    assert isinstance(staged, int)
    try:
        won = secret_store.put("c1", operator, expected_version=1)
    except VersionConflict:  # the put settled the staged answer first, then lost to it
        assert secret_store.get("c1").credential == answer
        assert secret_store.promote([Promotion("c1", staged, 1)]) == [staged]
    else:
        assert isinstance(secret_store.promote([Promotion("c1", staged, 1)])[0], VersionConflict)
        got = secret_store.get("c1")
        assert (got.version, got.credential) == (won, operator)


def test_a_staged_first_version_and_delete(secret_store: SecretStore) -> None:
    answer = credential("first")
    (staged,) = secret_store.stage([SecretWrite("c1", answer, None, attempt="a1")])
    assert isinstance(staged, int)
    assert secret_store.get("c1").credential == answer
    secret_store.delete("c1")
    assert secret_store.versions("c1") == []
    with pytest.raises(NotFound):
        secret_store.get("c1")


def test_stage_and_promote_of_nothing(secret_store: SecretStore) -> None:
    assert secret_store.stage([]) == []
    assert secret_store.promote([]) == []


def test_a_write_budget_is_per_connection_stable_and_spendable(secret_store: SecretStore) -> None:
    """``write_budget`` is None or a budget ``StateStore.take_budget`` accepts: a key that is
    the same on every call for one connection and differs between connections, a limit of
    at least one version, a window within the state store's bounds."""
    from tokenbroker.ports import MAX_BUDGET_KEY_LENGTH, MAX_BUDGET_LIMIT, MAX_BUDGET_WINDOW

    budget = secret_store.write_budget("c1")
    if budget is None:
        assert secret_store.write_budget("c2") is None
        return
    other = secret_store.write_budget("c2")
    assert other is not None
    assert budget == secret_store.write_budget("c1")
    assert budget.key != other.key
    assert 0 < len(budget.key) <= MAX_BUDGET_KEY_LENGTH
    assert 1 <= budget.limit <= MAX_BUDGET_LIMIT
    assert timedelta(0) < budget.window <= MAX_BUDGET_WINDOW
