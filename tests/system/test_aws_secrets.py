"""AWS Secrets Manager store on moto: crash recovery, staging labels, checksums, API calls.

The contract suite (tests/contract/test_secret_store.py, adapter "aws") covers the port's
semantics; this file covers what is particular to AWS. A "crash" is a BaseException raised
from a botocore event hook before or after a chosen API call: the request was (after) or was
not (before) applied by the server, and the store's process is "dead" from then on; the
recovery is observed through a second store with its own client, as another process would.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from tests.contract.builders import credential
from tests.support.moto_server import delete_secrets_with_prefix, moto_client, moto_endpoint
from tokenbroker.adapters.aws import (
    CURRENT,
    LATEST,
    NEXT,
    PENDING,
    PREVIOUS,
    AwsSecretsManagerStore,
    CorruptCredential,
    SecretsManagerRefused,
    encode_envelope,
    retain_label,
    version_token,
)
from tokenbroker.kernel.errors import (
    ConfigError,
    NotFound,
    StoreUnavailable,
    TokenBrokerError,
    VersionConflict,
)
from tokenbroker.kernel.model import Credential
from tokenbroker.ports import Promotion, SecretWrite

pytestmark = pytest.mark.system

CID = "acme"


class ProcessDied(BaseException):
    """Stands for the process dying: BaseException, so no ``except`` in the store sees it."""


@pytest.fixture
def prefix() -> Iterator[str]:
    value = f"tb-sys-{uuid.uuid4().hex[:12]}/"
    yield value
    delete_secrets_with_prefix(value)


@pytest.fixture
def open_store(prefix: str) -> Callable[..., AwsSecretsManagerStore]:
    """A new store (own boto3 client: another process) on the test's secrets."""

    def open_(retained_versions: int = 3) -> AwsSecretsManagerStore:
        return AwsSecretsManagerStore(
            moto_client(), prefix=prefix, retained_versions=retained_versions
        )

    return open_


@pytest.fixture
def aws(prefix: str) -> Any:
    """A plain boto3 client, for looking at (and tampering with) the secrets directly."""
    return moto_client()


def crash(store: AwsSecretsManagerStore, when: str, operation: str, nth: int = 1) -> None:
    """Make ``store`` die ``when`` ("before" or "after") its ``nth`` call of ``operation``."""
    seen = Counter[str]()

    def hook(model: Any, **_: Any) -> None:
        if model.name == operation:
            seen[operation] += 1
            if seen[operation] == nth:
                raise ProcessDied(f"died {when} {operation} #{nth}")

    store.client.meta.events.register(f"{when}-call.secrets-manager", hook)


class CallCounter:
    """API calls a store makes, by operation, from botocore's ``before-call`` event (one per
    logical call; botocore's own retries of a call are not counted again)."""

    def __init__(self, store: AwsSecretsManagerStore) -> None:
        self.calls = Counter[str]()
        store.client.meta.events.register("before-call.secrets-manager", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.calls[model.name] += 1

    def take(self) -> dict[str, int]:
        taken = dict(self.calls)
        self.calls.clear()
        return taken


def labels(aws: Any, name: str) -> dict[str, set[str]]:
    """VersionId -> staging labels, as Secrets Manager reports them (deprecated included)."""
    listed = aws.list_secret_version_ids(SecretId=name, IncludeDeprecated=True)["Versions"]
    return {v["VersionId"]: set(v.get("VersionStages") or ()) for v in listed}


def chain(store: AwsSecretsManagerStore, count: int, cid: str = CID) -> list[Credential]:
    creds = [credential(cid) for _ in range(count)]
    for n, cred in enumerate(creds, start=1):
        assert store.put(cid, cred, expected_version=n - 1 if n > 1 else None) == n
    return creds


def stored_value(aws: Any, store: AwsSecretsManagerStore, version: int) -> Credential:
    """Version ``version`` as Secrets Manager holds it, read past the store."""
    found = aws.get_secret_value(
        SecretId=store.secret_name(CID), VersionId=version_token(CID, version)
    )
    envelope = json.loads(found["SecretString"])
    assert envelope["v"] == version
    return Credential.from_plaintext(base64.b64decode(envelope["credential"]))


def assert_settled(aws: Any, store: AwsSecretsManagerStore, newest: int, cid: str = CID) -> None:
    """Labels after a finished rotation: AWSCURRENT and tokenbroker-latest on the newest,
    AWSPREVIOUS on the one before, AWSPENDING nowhere, retain labels on the retained."""
    found = labels(aws, store.secret_name(cid))

    def token(n: int) -> str:
        return version_token(cid, n)

    assert {CURRENT, LATEST} <= found[token(newest)]
    if newest > 1:
        assert PREVIOUS in found[token(newest - 1)]
    assert not any(PENDING in stages for stages in found.values()), found
    r = store.retained_versions
    for n in range(1, newest + 1):
        kept = n > newest - r
        assert (retain_label(n, r) in found[token(n)]) is kept, (n, found)


# --- crash recovery --------------------------------------------------------------------------

#: Where put (v2 -> v3) can die, in the order of its API calls: GetSecretValue (read latest),
#: PutSecretValue (createSecret), GetSecretValue (testSecret), UpdateSecretVersionStage
#: (finishSecret: AWSCURRENT), UpdateSecretVersionStage (take AWSPENDING off).
AFTER_CREATE_STEP = [
    ("after", "PutSecretValue", 1),
    ("before", "GetSecretValue", 2),
    ("after", "GetSecretValue", 2),
    ("before", "UpdateSecretVersionStage", 1),
    ("after", "UpdateSecretVersionStage", 1),
    ("after", "UpdateSecretVersionStage", 2),
]

#: What the next process does first after the crash: each must settle the rotation.
FIRST_ACTIONS = ["get", "get_many", "versions", "stale_put"]


@pytest.mark.parametrize("first", FIRST_ACTIONS)
@pytest.mark.parametrize("point", AFTER_CREATE_STEP, ids=lambda p: "{}-{}-{}".format(*p))
def test_a_crash_after_the_create_step_keeps_the_newest_credential(
    open_store: Callable[..., AwsSecretsManagerStore],
    aws: Any,
    point: tuple[str, str, int],
    first: str,
) -> None:
    writer = open_store()
    old = chain(writer, 2)
    rotated = credential("rotated")  # holds the refresh token the provider just issued
    crash(writer, *point)
    with pytest.raises(ProcessDied):
        writer.put(CID, rotated, expected_version=2)

    other = open_store()  # the next process
    if first == "get":
        assert (other.get(CID).version, other.get(CID).credential) == (3, rotated)
    elif first == "get_many":
        assert other.get_many([CID])[CID].credential == rotated
    elif first == "versions":
        assert other.versions(CID) == [1, 2, 3]
    else:  # a refresher that still believes v2 is current, with a credential of its own
        with pytest.raises(VersionConflict):
            other.put(CID, credential("stale"), expected_version=2)

    got = other.get(CID)
    assert (got.version, got.credential) == (3, rotated)
    assert other.versions(CID) == [1, 2, 3]
    assert [stored_value(aws, other, n) for n in (1, 2, 3)] == [*old, rotated]
    assert_settled(aws, other, 3)
    # Stale writers are refused; the dead writer's own retry is recognised as done.
    with pytest.raises(VersionConflict):
        other.put(CID, credential("stale"), expected_version=2)
    with pytest.raises(VersionConflict):
        other.put(CID, credential("staler"), expected_version=1)
    assert open_store().put(CID, rotated, expected_version=2) == 3
    # And the chain goes on from the recovered version.
    following = credential("next")
    assert other.put(CID, following, expected_version=3) == 4
    assert other.get(CID).credential == following
    assert other.versions(CID) == [2, 3, 4]
    assert_settled(aws, other, 4)


@pytest.mark.parametrize(
    "point",
    [("after", "GetSecretValue", 2), ("after", "UpdateSecretVersionStage", 1)],
    ids=["read-current", "promoted"],
)
def test_a_crash_while_settling_is_settled_by_the_next_reader(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any, point: tuple[str, str, int]
) -> None:
    writer = open_store()
    chain(writer, 2)
    rotated = credential("rotated")
    crash(writer, "after", "PutSecretValue")
    with pytest.raises(ProcessDied):
        writer.put(CID, rotated, expected_version=2)
    first_reader = open_store()
    crash(first_reader, *point)
    with pytest.raises(ProcessDied):
        first_reader.get(CID)
    second_reader = open_store()
    assert (second_reader.get(CID).version, second_reader.get(CID).credential) == (3, rotated)
    assert second_reader.versions(CID) == [1, 2, 3]
    assert_settled(aws, second_reader, 3)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_crash_at_or_before_the_first_read_changes_nothing(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any, when: str
) -> None:
    writer = open_store()
    old = chain(writer, 2)
    crash(writer, when, "GetSecretValue" if when == "after" else "PutSecretValue")
    with pytest.raises(ProcessDied):
        writer.put(CID, credential(), expected_version=2)
    other = open_store()
    assert (other.get(CID).version, other.get(CID).credential) == (2, old[1])
    assert other.versions(CID) == [1, 2]
    assert_settled(aws, other, 2)
    assert other.put(CID, credential(), expected_version=2) == 3


def test_a_crash_between_creating_the_secret_and_its_first_version(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    writer = open_store()
    crash(writer, "after", "CreateSecret")
    with pytest.raises(ProcessDied):
        writer.put(CID, credential(), expected_version=None)
    other = open_store()
    with pytest.raises(NotFound):
        other.get(CID)
    assert other.versions(CID) == []
    assert other.get_many([CID]) == {}
    with pytest.raises(VersionConflict):
        other.put(CID, credential(), expected_version=1)
    first = credential()
    assert other.put(CID, first, expected_version=None) == 1
    assert other.get(CID).credential == first
    assert_settled(aws, other, 1)


def test_a_crash_after_the_first_version_is_written_is_idempotent_on_retry(
    open_store: Callable[..., AwsSecretsManagerStore],
) -> None:
    writer = open_store()
    first = credential()
    crash(writer, "after", "PutSecretValue")
    with pytest.raises(ProcessDied):
        writer.put(CID, first, expected_version=None)
    other = open_store()
    assert other.get(CID).credential == first
    assert other.put(CID, first, expected_version=None) == 1  # the retry: already done
    with pytest.raises(VersionConflict):
        other.put(CID, credential(), expected_version=None)


def test_a_reader_finishing_a_rotation_while_its_writer_still_runs(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    """A reader between the writer's createSecret and finishSecret promotes the version
    itself; the writer, resuming, sees its version current and returns it."""
    writer, reader = open_store(), open_store()
    chain(writer, 2)
    rotated = credential("rotated")
    seen: dict[str, Any] = {}

    def reader_sneaks_in(model: Any, **_: Any) -> None:
        if model.name == "PutSecretValue" and "read" not in seen:
            seen["read"] = reader.get(CID)

    writer.client.meta.events.register("after-call.secrets-manager", reader_sneaks_in)
    assert writer.put(CID, rotated, expected_version=2) == 3
    assert (seen["read"].version, seen["read"].credential) == (3, rotated)
    assert_settled(aws, writer, 3)


# --- staging labels and retention ------------------------------------------------------------


def test_staging_labels_follow_the_rotations(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    store = open_store()
    name = store.secret_name(CID)
    for newest in range(1, 6):
        chain_from = newest - 1
        store.put(CID, credential(), expected_version=chain_from or None)
        assert_settled(aws, store, newest)
    found = labels(aws, name)
    assert sorted(found) == sorted(version_token(CID, n) for n in range(1, 6))
    assert found[version_token(CID, 5)] == {CURRENT, LATEST, retain_label(5, 3)}
    assert found[version_token(CID, 4)] == {PREVIOUS, retain_label(4, 3)}
    assert found[version_token(CID, 3)] == {retain_label(3, 3)}
    assert found[version_token(CID, 2)] == set()  # deprecated: Secrets Manager may delete it
    assert found[version_token(CID, 1)] == set()
    described = aws.describe_secret(SecretId=name)
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        "managed-by": "tokenbroker",
        "connection": CID,
    }
    # AWS's own reading of "current" agrees with the store's.
    current = aws.get_secret_value(SecretId=name, VersionStage=CURRENT)
    assert current["VersionId"] == version_token(CID, 5)
    assert json.loads(current["SecretString"])["v"] == 5


def test_retaining_one_version_deprecates_the_previous_one(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    store = open_store(retained_versions=1)
    chain(store, 3)
    found = labels(aws, store.secret_name(CID))
    assert found[version_token(CID, 3)] == {CURRENT, LATEST, retain_label(3, 1)}
    assert found[version_token(CID, 2)] == set()
    assert found[version_token(CID, 1)] == set()
    assert store.versions(CID) == [3]


def test_a_smaller_retention_takes_effect_and_clears_old_labels(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    chain(open_store(retained_versions=5), 5)
    smaller = open_store(retained_versions=2)
    assert smaller.versions(CID) == [4, 5]  # and the labels of 1-3 are removed
    smaller.put(CID, credential(), expected_version=5)
    assert smaller.versions(CID) == [5, 6]
    found = labels(aws, smaller.secret_name(CID))
    assert all(found[version_token(CID, n)] == set() for n in (1, 2, 3))


def test_retention_is_bounded_by_the_staging_label_quota() -> None:
    with pytest.raises(ConfigError):
        AwsSecretsManagerStore(moto_client(), retained_versions=9)
    with pytest.raises(ConfigError):
        AwsSecretsManagerStore(moto_client(), retained_versions=0)
    with pytest.raises(ConfigError):
        AwsSecretsManagerStore(moto_client(), prefix="bad prefix/")


# --- checksums -------------------------------------------------------------------------------


def _tampered(version: int, genuine: Credential, forged: Credential) -> str:
    """An envelope numbered ``version`` carrying ``forged`` under ``genuine``'s digest."""
    envelope = json.loads(encode_envelope(version, forged))
    envelope["sha256"] = json.loads(encode_envelope(version, genuine))["sha256"]
    return json.dumps(envelope)


def test_a_tampered_current_version_is_refused(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    store = open_store()
    creds = chain(store, 2)
    name = store.secret_name(CID)
    forged_id = version_token(CID, 3)
    aws.put_secret_value(
        SecretId=name,
        ClientRequestToken=forged_id,
        SecretString=_tampered(3, creds[1], credential("forged")),
        VersionStages=[LATEST],
    )
    aws.update_secret_version_stage(
        SecretId=name,
        VersionStage=CURRENT,
        MoveToVersionId=forged_id,
        RemoveFromVersionId=version_token(CID, 2),
    )
    with pytest.raises(CorruptCredential) as refused:
        store.get(CID)
    assert not refused.value.retryable
    # One bad record is that connection's value in a batch read, never the batch's failure.
    assert isinstance(store.get_many([CID])[CID], CorruptCredential)
    with pytest.raises(CorruptCredential):
        store.put(CID, credential(), expected_version=3)
    assert stored_value(aws, store, 2) == creds[1]  # older versions are left alone


def test_a_value_copied_to_another_version_is_refused(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    """The envelope's version number must match the VersionId it is stored under."""
    store = open_store()
    chain(store, 1)
    name = store.secret_name(CID)
    first = aws.get_secret_value(SecretId=name, VersionStage=CURRENT)
    aws.put_secret_value(
        SecretId=name,
        ClientRequestToken=version_token(CID, 2),
        SecretString=first["SecretString"],
        VersionStages=[LATEST],
    )
    aws.update_secret_version_stage(
        SecretId=name,
        VersionStage=CURRENT,
        MoveToVersionId=version_token(CID, 2),
        RemoveFromVersionId=version_token(CID, 1),
    )
    with pytest.raises(CorruptCredential, match="mismatch"):
        store.get(CID)


def test_a_tampered_pending_version_is_discarded_and_the_current_one_served(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    store = open_store()
    creds = chain(store, 2)
    name = store.secret_name(CID)
    aws.put_secret_value(
        SecretId=name,
        ClientRequestToken=version_token(CID, 3),
        SecretString=_tampered(3, creds[1], credential("forged")),
        VersionStages=[PENDING, LATEST, retain_label(3, 3)],
    )
    reader = open_store()
    got = reader.get(CID)
    assert (got.version, got.credential) == (2, creds[1])
    found = labels(aws, name)
    assert found[version_token(CID, 3)] == set()
    assert LATEST in found[version_token(CID, 2)]
    assert reader.versions(CID) == [1, 2]
    # Its VersionId is spent for good; the next write takes the number after it.
    assert reader.put(CID, credential(), expected_version=2) == 4


def _discarded_v3(store: AwsSecretsManagerStore, aws: Any) -> list[Credential]:
    """v1, v2 current, and a tampered v3 left pending, as a writer that crashed would."""
    creds = chain(store, 2)
    aws.put_secret_value(
        SecretId=store.secret_name(CID),
        ClientRequestToken=version_token(CID, 3),
        SecretString=_tampered(3, creds[1], credential("forged")),
        VersionStages=[PENDING, LATEST, retain_label(3, 3)],
    )
    return creds


def test_a_discarded_version_id_never_refuses_the_answer_staged_after_it(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    """Issue 8, row 30: a version discarded as unreadable keeps its VersionId for good, so
    the next write of its number was refused -- at PutSecretValue, after the provider had
    consumed the refresh token whose answer it carried. The discard now leaves a marker on
    the current version, and the next stage skips the spent number on its first try."""
    store = open_store()
    _discarded_v3(store, aws)
    reader = open_store()
    assert reader.get(CID).version == 2  # the read settles v3: discarded
    answer = credential()
    counter = CallCounter(reader)
    assert reader.stage([SecretWrite(CID, answer, 2, attempt="a1")]) == [4]
    assert counter.take()["PutSecretValue"] == 1  # no refused write on the way
    assert reader.promote([Promotion(CID, 4, 2)]) == [4]
    got = open_store().get(CID)
    assert (got.version, got.credential) == (4, answer)
    # Once a later version is current the marker has done its work: the next write is 5.
    assert reader.put(CID, credential(), expected_version=4) == 5
    reader.versions(CID)  # housekeeping
    assert not [
        label
        for found in labels(aws, reader.secret_name(CID)).values()
        for label in found
        if label.startswith(NEXT)
    ]


def test_a_reader_settling_the_discard_leaves_the_marker_too(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    """Whoever settles (a reader, another writer), the marker is on the current version
    before ``tokenbroker-latest`` comes back to it."""
    store = open_store()
    _discarded_v3(store, aws)
    open_store().versions(CID)  # settled by a listing
    found = labels(aws, store.secret_name(CID))
    assert f"{NEXT}{4:012d}" in found[version_token(CID, 2)]
    assert LATEST in found[version_token(CID, 2)]
    assert open_store().put(CID, credential(), expected_version=2) == 4


def test_a_spent_version_id_without_a_marker_is_skipped_at_the_write(
    open_store: Callable[..., AwsSecretsManagerStore], aws: Any
) -> None:
    """A version discarded before markers existed (or whose marker was removed by hand):
    the refused PutSecretValue finds it deprecated, marks the current version and writes the
    next number, so the answer in hand is kept."""
    store = open_store()
    _discarded_v3(store, aws)
    name = store.secret_name(CID)
    open_store().get(CID)
    aws.update_secret_version_stage(
        SecretId=name, VersionStage=f"{NEXT}{4:012d}", RemoveFromVersionId=version_token(CID, 2)
    )
    answer = credential()
    assert open_store().stage([SecretWrite(CID, answer, 2, attempt="a1")]) == [4]
    assert open_store().promote([Promotion(CID, 4, 2)]) == [4]
    assert open_store().get(CID).credential == answer


def test_the_version_quota_is_a_write_budget(
    open_store: Callable[..., AwsSecretsManagerStore],
) -> None:
    """Secrets Manager keeps every version younger than 24 hours and removes unlabelled ones
    only beyond 100 (reference_limits.html): the versions one secret may take in 24 hours,
    leaving room for the labelled ones, as a budget the refresher spends before presenting."""
    store = open_store(retained_versions=3)
    budget = store.write_budget(CID)
    assert budget is not None
    assert budget.window == timedelta(hours=24)
    assert 1 <= budget.limit <= 100 - 3 - 3  # the ring, AWSPREVIOUS, and a discard's margin
    assert CID not in budget.key  # a digest: the same for every handle, nothing in clear
    assert budget.key == open_store(retained_versions=3).write_budget(CID).key  # type: ignore[union-attr]
    assert budget.key != store.write_budget("other").key  # type: ignore[union-attr]


# --- API calls -------------------------------------------------------------------------------


def test_api_calls_per_operation(open_store: Callable[..., AwsSecretsManagerStore]) -> None:
    """The numbers behind the README's cost table (printed with -s)."""
    store = open_store()
    counter = CallCounter(store)
    measured: dict[str, dict[str, int]] = {}

    store.put(CID, credential(), expected_version=None)
    measured["put (first version)"] = counter.take()
    for n in range(1, 4):
        store.put(CID, credential(), expected_version=n)
    counter.take()
    store.put(CID, credential(), expected_version=4)
    measured["put (refresh)"] = counter.take()
    store.get(CID)
    measured["get"] = counter.take()
    store.get_many([CID, "missing"])
    measured["get_many (2 ids)"] = counter.take()
    store.versions(CID)
    measured["versions"] = counter.take()
    with pytest.raises(VersionConflict):
        store.put(CID, credential(), expected_version=4)
    measured["put (stale, refused)"] = counter.take()
    store.delete(CID)
    measured["delete"] = counter.take()

    for what, calls in measured.items():
        print(f"{what}: {sum(calls.values())} {calls}")
    assert measured == {
        "put (first version)": {"CreateSecret": 1, "PutSecretValue": 1, "GetSecretValue": 1},
        "put (refresh)": {"GetSecretValue": 2, "PutSecretValue": 1, "UpdateSecretVersionStage": 2},
        "get": {"GetSecretValue": 1},
        "get_many (2 ids)": {"GetSecretValue": 2},
        "versions": {"ListSecretVersionIds": 1},
        "put (stale, refused)": {"GetSecretValue": 1},
        "delete": {"DescribeSecret": 1, "DeleteSecret": 1},
    }

    one = open_store(retained_versions=1)
    chain(one, 2, cid="single")
    counter = CallCounter(one)
    one.put("single", credential(), expected_version=2)
    assert counter.take() == {
        "GetSecretValue": 2,
        "PutSecretValue": 1,
        "UpdateSecretVersionStage": 3,
    }


def test_a_lost_race_costs_one_more_read(open_store: Callable[..., AwsSecretsManagerStore]) -> None:
    """Two writers read v1; the second one's createSecret is refused (same VersionId, other
    data) and it checks once that the version it lost to is not a discarded one."""
    first, second = open_store(), open_store()
    chain(first, 1)
    counter = CallCounter(second)

    def first_writes_meanwhile(model: Any, **_: Any) -> None:
        if model.name == "GetSecretValue" and not counter.calls.get("PutSecretValue"):
            second.client.meta.events.unregister(
                "after-call.secrets-manager", first_writes_meanwhile
            )
            first.put(CID, credential(), expected_version=1)

    second.client.meta.events.register("after-call.secrets-manager", first_writes_meanwhile)
    with pytest.raises(VersionConflict):
        second.put(CID, credential(), expected_version=1)
    assert counter.take() == {"GetSecretValue": 2, "PutSecretValue": 1}


# --- errors ----------------------------------------------------------------------------------


def _stubbed(code: str, status: int) -> AwsSecretsManagerStore:
    from botocore.stub import Stubber

    client = moto_client()
    stubber = Stubber(client)
    stubber.add_client_error("get_secret_value", service_error_code=code, http_status_code=status)
    stubber.activate()
    return AwsSecretsManagerStore(client, prefix="stubbed/")


@pytest.mark.parametrize(
    ("code", "status", "expected", "retryable"),
    [
        ("ThrottlingException", 400, StoreUnavailable, True),
        ("InternalServiceError", 500, StoreUnavailable, True),
        ("ResourceNotFoundException", 400, NotFound, False),
        ("AccessDeniedException", 400, ConfigError, False),
        ("DecryptionFailure", 400, ConfigError, False),
        ("InvalidParameterException", 400, SecretsManagerRefused, False),
    ],
)
def test_aws_errors_become_tokenbroker_errors(
    code: str, status: int, expected: type[TokenBrokerError], retryable: bool
) -> None:
    with pytest.raises(expected) as raised:
        _stubbed(code, status).get(CID)
    assert raised.value.retryable is retryable
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert type(raised.value).__module__.startswith("tokenbroker")


def test_an_unreachable_endpoint_is_store_unavailable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the store dials it
    import boto3
    from botocore.config import Config

    unreachable = boto3.session.Session(
        region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
    ).client(
        "secretsmanager",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1),
    )
    with pytest.raises(StoreUnavailable) as raised:
        AwsSecretsManagerStore(unreachable).get(CID)
    assert raised.value.retryable
    assert raised.value.__cause__ is None


def test_importing_the_adapter_does_not_import_boto3() -> None:
    code = (
        "import sys, tokenbroker.adapters.aws; "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the test server behaves as AWS documents ------------------------------------------------


def test_moto_refuses_other_data_under_an_existing_version_id(aws: Any, prefix: str) -> None:
    """PutSecretValue: same token + same data does nothing; other data fails, even on an
    AWSPENDING version (stock moto overwrites that one: tests/support/moto_server.py)."""
    name = f"{prefix}idempotency"
    aws.create_secret(Name=name, SecretString="v1")
    token = "t" * 40
    aws.put_secret_value(
        SecretId=name, ClientRequestToken=token, SecretString="v2", VersionStages=[PENDING]
    )
    again = aws.put_secret_value(
        SecretId=name, ClientRequestToken=token, SecretString="v2", VersionStages=["other"]
    )
    assert again["VersionStages"] == [PENDING]
    with pytest.raises(aws.exceptions.ResourceExistsException):
        aws.put_secret_value(
            SecretId=name, ClientRequestToken=token, SecretString="v3", VersionStages=[PENDING]
        )
    assert aws.get_secret_value(SecretId=name, VersionId=token)["SecretString"] == "v2"


def test_moto_lists_versions_of_a_missing_secret_as_not_found(aws: Any, prefix: str) -> None:
    with pytest.raises(aws.exceptions.ResourceNotFoundException):
        aws.list_secret_version_ids(SecretId=f"{prefix}missing")


def test_the_endpoint_is_shared(aws: Any) -> None:
    assert aws.meta.endpoint_url == moto_endpoint()


def test_the_refresher_defers_before_presenting_once_the_secret_takes_no_more_versions(
    prefix: str,
) -> None:
    """Row 30's other half: a write over the version quota was refused after the provider
    had consumed the token. The tick spends the store's write budget before presenting, so
    over it nothing is sent and the connection is deferred, not failed."""
    from tests.unit.refresh.test_tick import World
    from tokenbroker.kernel.model import ConnectionStatus
    from tokenbroker.refresh.registry import ConnectionRegistry

    world = World()
    world.secrets = AwsSecretsManagerStore(  # type: ignore[assignment]
        moto_client(), prefix=prefix, version_budget=2
    )
    world.registry = ConnectionRegistry(
        secrets=world.secrets, state=world.state, profiles=world.profiles, clock=world.clock
    )
    world.add("c1")
    for _ in range(2):
        assert world.tick(connection_ids=["c1"]).refreshed == 1
    sent = world.server.requests["refresh_token"]
    summary = world.tick(connection_ids=["c1"])
    assert world.server.requests["refresh_token"] == sent  # nothing presented
    assert (summary.refreshed, summary.deferred, sum(summary.failed.values())) == (0, 1, 0)
    assert summary.over_budget == 1  # at risk too: the slot frees after the access token expires
    assert summary.over_budget_at_risk == 1
    record = world.state.get("c1")
    assert record.state.status is ConnectionStatus.ACTIVE
    assert record.state.current_version == world.secrets.get("c1").version == 3
    world.clock.advance(24 * 3600 + 1)
    assert world.tick(connection_ids=["c1"]).refreshed == 1
