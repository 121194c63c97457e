"""Secret Manager store behaviour beyond the port contract: calls per refresh, the overlap
window, and writes whose outcome is unknown."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.api_core import exceptions

from tests.contract.builders import connection
from tests.support.secretmanager_server import SecretManagerTestServer
from tokenbroker.adapters.gcp.secret_manager import SecretManagerSecretStore
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import ConfigError, PermissionDenied, StoreUnavailable
from tokenbroker.kernel.model import ConnectionStatus, Credential, RefreshState
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import SecretWrite

pytestmark = pytest.mark.system
T0 = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def server() -> Iterator[SecretManagerTestServer]:
    with SecretManagerTestServer().start() as running:
        yield running


def credential(n: int, lifetime: int = 3600) -> Credential:
    obtained = T0 + timedelta(seconds=1800 * n)
    return Credential(
        refresh_token=Secret(f"rt-{n}"),
        access_token=Secret(f"at-{n}"),
        obtained_at=obtained,
        expires_at=obtained + timedelta(seconds=lifetime),
    )


def store_on(server: SecretManagerTestServer, client: Any = None) -> SecretManagerSecretStore:
    project = f"p-{uuid.uuid4().hex[:8]}"
    return SecretManagerSecretStore(client or server.client(), project=project, retained_versions=3)


def states(server: SecretManagerTestServer, store: SecretManagerSecretStore) -> dict[int, str]:
    listed = server.client().list_secret_versions(request={"parent": store.secret_name("c1")})
    return {int(v.name.rsplit("/", 1)[1]): v.state.name for v in listed}


def test_a_refresh_costs_two_reads_and_four_writes(server: SecretManagerTestServer) -> None:
    store = store_on(server)
    version = store.put("c1", credential(0), expected_version=None)
    for n in range(1, 4):
        version = store.put("c1", credential(n), expected_version=version)
    server.reset_calls()
    stored = store.get("c1")  # the refresher reads...
    store.put("c1", credential(4), expected_version=stored.version)  # ...then writes
    calls = server.calls
    assert calls["GetSecret"] == 1  # the write reused the read's etag
    assert calls["AccessSecretVersion"] == 1
    assert calls["AddSecretVersion"] == 1
    assert calls["UpdateSecret"] == 1
    assert calls["DisableSecretVersion"] == 1
    assert calls["DestroySecretVersion"] == 1


def test_previous_version_stays_enabled_through_its_overlap_then_is_disabled(
    server: SecretManagerTestServer,
) -> None:
    store = store_on(server)
    v1 = store.put("c1", credential(0), expected_version=None)  # valid until T0+1h
    v2 = store.put("c1", credential(1), expected_version=v1)  # at T0+30m: v1 still valid
    assert states(server, store) == {1: "ENABLED", 2: "ENABLED"}
    # A consumer that read v1 from Secret Manager can still read it.
    old = server.client().access_secret_version(
        request={"name": f"{store.secret_name('c1')}/versions/{v1}"}
    )
    assert Credential.from_plaintext(old.payload.data).access_token == Secret("at-0")
    v3 = store.put("c1", credential(2), expected_version=v2)  # at T0+1h: v1 expired
    assert states(server, store) == {1: "DISABLED", 2: "ENABLED", 3: "ENABLED"}
    store.put("c1", credential(3), expected_version=v3)  # retention 3 destroys v1
    assert states(server, store) == {1: "DESTROYED", 2: "DISABLED", 3: "ENABLED", 4: "ENABLED"}
    assert store.get("c1").version == 4


class LossyUpdates:
    """The real client, except UpdateSecret fails once: before or after it is applied."""

    def __init__(self, real: Any, *, applied: bool) -> None:
        self._real = real
        self._applied = applied
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def update_secret(self, request: Any) -> Any:
        if self.failed:
            return self._real.update_secret(request=request)
        self.failed = True
        if self._applied:
            self._real.update_secret(request=request)
        raise exceptions.ServiceUnavailable("connection reset")


def test_an_update_that_landed_but_whose_answer_was_lost_counts_as_written(
    server: SecretManagerTestServer,
) -> None:
    store = store_on(server, LossyUpdates(server.client(), applied=True))
    assert store.put("c1", credential(0), expected_version=None) == 1
    assert store.get("c1").credential.refresh_token == Secret("rt-0")
    assert states(server, store) == {1: "ENABLED"}  # not destroyed by mistake


def test_an_update_that_failed_leaves_no_readable_orphan(server: SecretManagerTestServer) -> None:
    good = store_on(server)
    v1 = good.put("c1", credential(0), expected_version=None)
    lossy = SecretManagerSecretStore(
        LossyUpdates(server.client(), applied=False), project=good.project
    )
    # The re-read shows the current version is still the expected one: retried, and it lands.
    assert lossy.put("c1", credential(1), expected_version=v1) == 2
    assert good.get("c1").credential.refresh_token == Secret("rt-1")


def test_a_store_outage_during_update_is_reported_and_the_staged_version_kept(
    server: SecretManagerTestServer,
) -> None:
    """Issue 8: a second UpdateSecret failure destroyed the only copy of the new refresh
    token. The added version is staged on the current one: it stays, and the next reader
    settles it (makes it current)."""
    good = store_on(server)
    v1 = good.put("c1", credential(0), expected_version=None)

    class AlwaysDown(LossyUpdates):
        def update_secret(self, request: Any) -> Any:  # noqa: ARG002 - it never gets that far
            raise exceptions.ServiceUnavailable("down")

    down = SecretManagerSecretStore(
        AlwaysDown(server.client(), applied=False), project=good.project
    )
    with pytest.raises(StoreUnavailable):
        down.put("c1", credential(1), expected_version=v1)
    assert states(server, good) == {1: "ENABLED", 2: "ENABLED"}  # not destroyed
    settled = good.get("c1")  # the next reader
    assert (settled.version, settled.credential.refresh_token) == (2, Secret("rt-1"))


def test_a_crash_between_add_and_update_is_settled_by_the_next_read(
    server: SecretManagerTestServer,
) -> None:
    """The writer dies after AddSecretVersion (the stage): the orphan used to be ``latest``
    and lost; now the next read promotes it, in one extra UpdateSecret."""
    from tokenbroker.ports import SecretWrite

    writer = store_on(server)
    v1 = writer.put("c1", credential(0), expected_version=None)
    (staged,) = writer.stage([SecretWrite("c1", credential(1), v1, attempt="a1")])
    reader = SecretManagerSecretStore(server.client(), project=writer.project)
    server.reset_calls()
    got = reader.get("c1")
    assert (got.version, got.credential.refresh_token) == (staged, Secret("rt-1"))
    assert server.calls["UpdateSecret"] == 1
    server.reset_calls()
    reader.get("c1")  # settled: back to two calls per read
    assert (server.calls["GetSecret"], server.calls["AccessSecretVersion"]) == (1, 1)
    assert server.calls["UpdateSecret"] == 0


def test_the_test_server_is_a_setting_passed_in_not_read_from_the_environment(
    server: SecretManagerTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter reads no environment: the settings read
    ``TOKENBROKER_SECRET_MANAGER_ENDPOINT`` and the composition root passes it as ``endpoint``."""
    monkeypatch.delenv("TOKENBROKER_SECRET_MANAGER_ENDPOINT", raising=False)
    project = f"p-{uuid.uuid4().hex[:8]}"
    settings = Settings.from_env(
        {
            "TOKENBROKER_BACKEND": "memory",
            "TOKENBROKER_SECRET_STORE": "secret-manager",
            "TOKENBROKER_GCP_PROJECT": project,
            "TOKENBROKER_SECRET_MANAGER_ENDPOINT": server.address,
        }
    )
    assert settings.secret_manager_endpoint == server.address
    runtime = build_runtime(settings)
    try:
        # The state store holds the record (and so the current-version pointer) first, as the
        # registry does; the secret store then writes its first version to the test server.
        runtime.state.create(connection("c1"), RefreshState(status=ConnectionStatus.ACTIVE))
        assert runtime.secrets.put("c1", credential(0), expected_version=None) == 1
        listed = server.client().list_secret_versions(
            request={"parent": f"projects/{project}/secrets/tokenbroker-c1"}
        )
        assert [v.name.rsplit("/", 1)[1] for v in listed] == ["1"]
        assert runtime.secrets.get("c1").credential.refresh_token == Secret("rt-0")
    finally:
        runtime.close()


class FailingDestroys:
    """The real client, except DestroySecretVersion fails while ``down``."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.down = True
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def destroy_secret_version(self, request: Any) -> Any:
        if self.down:
            self.refused += 1
            raise exceptions.ServiceUnavailable("destroy failed")
        return self._real.destroy_secret_version(request=request)


def test_a_destroy_that_failed_is_retried_by_a_later_write(
    server: SecretManagerTestServer,
) -> None:
    """Issue 8: failed destroys were never retried -- each write destroys only the version
    retention drops at that write, so a version whose destroy failed (with the refresh token
    it holds) stayed readable for ever. Every ``SWEEP_EVERY``-th version also lists the
    undestroyed versions and destroys those retention dropped."""
    from tokenbroker.adapters.gcp.secret_manager import SWEEP_EVERY

    flaky = FailingDestroys(server.client())
    store = store_on(server, flaky)
    version = store.put("c1", credential(0), expected_version=None)
    for n in range(1, 6):  # versions 2..6: retention (3) drops 1..3, every destroy fails
        version = store.put("c1", credential(n), expected_version=version)
    assert flaky.refused >= 3
    assert {v for v, s in states(server, store).items() if s != "DESTROYED"} >= {1, 2, 3}
    flaky.down = False
    while version % SWEEP_EVERY:
        version = store.put("c1", credential(version), expected_version=version)
    kept = {v for v, s in states(server, store).items() if s != "DESTROYED"}
    assert kept == {version - 2, version - 1, version}  # the newest three, nothing older


# --- a reader with the issuer's permissions ------------------------------------------------

#: What the Terraform module grants the issuer on the broker's secrets (terraform/README.md).
ISSUER_PERMISSIONS = {"secretmanager.secrets.get", "secretmanager.versions.access"}


def test_a_reader_that_may_not_promote_reads_the_current_version_and_leaves_the_staged_one(
    server: SecretManagerTestServer,
) -> None:
    """Issue 10: the issuer's read found a version a crashed refresher staged but did not
    promote, tried to settle it (UpdateSecret, which the issuer may not do) and failed every
    read of that connection until the refresher came back. A reader refused the promotion
    reads the current version instead; the staged one stays for the refresher to settle."""
    refresher = store_on(server)
    refresher.put("c1", credential(1), expected_version=None)
    (staged,) = refresher.stage([SecretWrite("c1", credential(2), 1, attempt="a1")])
    server.restrict("issuer-test", ISSUER_PERMISSIONS)
    issuer = SecretManagerSecretStore(
        server.client("issuer-test"), project=refresher.project, retained_versions=3
    )
    updates = server.calls["UpdateSecret"]
    for _ in range(2):  # and again: the second read does not try the promotion again
        got = issuer.get("c1")
        assert (got.version, got.credential) == (1, credential(1))
    assert server.calls["UpdateSecret"] - updates == 1  # refused once, not on every read
    settled = store_on_project(server, refresher.project).get("c1")  # the refresher's next read
    assert (settled.version, settled.credential) == (staged, credential(2))
    got = issuer.get("c1")
    assert (got.version, got.credential) == (staged, credential(2))


def test_a_reader_without_access_gets_a_clear_configuration_error(
    server: SecretManagerTestServer,
) -> None:
    refresher = store_on(server)
    refresher.put("c1", credential(1), expected_version=None)
    server.restrict("no-access-test", {"secretmanager.secrets.get"})
    reader = SecretManagerSecretStore(
        server.client("no-access-test"), project=refresher.project, retained_versions=3
    )
    with pytest.raises(ConfigError) as raised:
        reader.get("c1")
    assert isinstance(raised.value, PermissionDenied)
    assert "access secret version: permission denied" in str(raised.value)
    assert "service account" in str(raised.value)


def store_on_project(server: SecretManagerTestServer, project: str) -> SecretManagerSecretStore:
    return SecretManagerSecretStore(server.client(), project=project, retained_versions=3)
