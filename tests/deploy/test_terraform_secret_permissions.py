"""The module's Secret Manager roles (iam.tf) carry what the deployed broker calls, and the
broker calls nothing they leave out.

The functions run Secret Manager's pointer protocol (``secret_manager_pointed.py``: the
current version lives in the Firestore record; main.tf pins Secret Manager with Firestore).
Here that protocol runs on the Secret Manager test server (``tests/support/secretmanager_server
.py``: the official client over gRPC; a restricted caller gets PERMISSION_DENIED from every
method whose documented permission it lacks), each party calling as a principal that holds
exactly the permissions iam.tf gives it, read from the parsed file:

* the refresher: the real :class:`~tokenbroker.refresh.tick.Refresher` ticks against a provider
  that rotates refresh tokens and revokes the grant on reuse, through retention, and through
  the leftovers crashed writers leave (a staged chain, a loser's version on top);
* the connect function (it holds the refresher's role): re-connects an account, and loses a
  race to a refresh;
* the issuer: reads the current version in each of those states;
* the operator's CLI (terraform/README.md: whoever adds and removes connections): the
  registry's add and remove, with the refresher's role plus ``secrets.create`` and
  ``secrets.delete``.

The pointers live in a :class:`~tokenbroker.adapters.memory.MemoryStateStore` (the Firestore
store has the same contract: tests/contract/test_version_pointers.py).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterator

import pytest
from google.api_core import exceptions

from tests.deploy import hcl
from tests.support.secretmanager_server import PERMISSIONS, SecretManagerTestServer
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.gcp.firestore import FirestoreStateStore
from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore
from tokenbroker.adapters.memory import MemoryEventBus, MemoryStateStore
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import PermissionDenied, VersionConflict
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.profiles import load_profiles
from tokenbroker.ports import SecretWrite, VersionPointers
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher, TickSummary

pytestmark = pytest.mark.terraform

#: What the operator adding and removing connections needs beyond the refresher's role.
REGISTRY = frozenset({"secretmanager.secrets.create", "secretmanager.secrets.delete"})


def _role(name: str) -> frozenset[str]:
    module = hcl.load(hcl.MODULE)
    permissions = module.resource(f"google_project_iam_custom_role.{name}").body["permissions"]
    assert isinstance(permissions, list), permissions
    return frozenset(permissions)


@pytest.fixture(scope="module")
def server() -> Iterator[SecretManagerTestServer]:
    with SecretManagerTestServer().start() as running:
        running.restrict("refresher", _role("refresher_secrets"))
        running.restrict("connect", _role("refresher_secrets"))
        running.restrict("issuer", _role("issuer_secrets"))
        running.restrict("operator", _role("refresher_secrets") | REGISTRY)
        yield running


class Deployment:
    """One project's connections: a state store holding the pointers, a rotating provider,
    and a handle per party, each calling as its own principal."""

    def __init__(self, server: SecretManagerTestServer) -> None:
        self.server = server
        self.project = f"p-{uuid.uuid4().hex[:8]}"
        self.clock = FakeClock()
        self.state = MemoryStateStore(self.clock)
        self.provider = FakeTokenServer()
        self.profiles = load_profiles()

    def handle(self, principal: str) -> PointedSecretManagerStore:
        """A new process's store (its own client, nothing remembered), as ``principal``."""
        return PointedSecretManagerStore(
            self.server.client(principal),
            project=self.project,
            retained_versions=3,
            pointers=self.state,
        )

    def registry(self, principal: str) -> ConnectionRegistry:
        return ConnectionRegistry(
            secrets=self.handle(principal),
            state=self.state,
            profiles=self.profiles,
            clock=self.clock,
        )

    def add(self, cid: str = "c1") -> None:
        """``tokenbroker add`` on the operator's machine: due at once."""
        self.registry("operator").register(
            Connection(
                id=cid,
                profile="generic",
                grant=GrantType.REFRESH_TOKEN,
                client_id="client",
                token_url="https://idp.test/token",
            ),
            Credential(
                refresh_token=Secret(self.provider.seed_refresh_token()),
                client_secret=Secret("client-secret"),
            ),
        )

    def tick(self, secrets: PointedSecretManagerStore | None = None) -> TickSummary:
        """One tick of a refresher instance, after its connections fell due."""
        self.clock.advance(2400)  # past half the 3600 s lifetime: due, not expired
        refresher = Refresher(
            secrets=secrets or self.handle("refresher"),
            state=self.state,
            events=MemoryEventBus(),
            profiles=self.profiles,
            clock=self.clock,
            rng=random.Random(13),
            holder=f"refresher-{uuid.uuid4().hex[:6]}",
        )
        summary = asyncio.run(refresher.tick(self.provider))
        assert summary.ok and not summary.failed["internal"], summary.to_json()
        return summary

    def pointer(self, cid: str = "c1") -> int | None:
        return self.state.get(cid).state.current_version

    def states(self, cid: str = "c1") -> dict[int, str] | None:
        """Every version's state, as an administrator lists them; ``None``: no secret."""
        name = f"projects/{self.project}/secrets/tokenbroker-{cid}"
        try:
            listed = self.server.client().list_secret_versions(request={"parent": name})
            return {int(v.name.rsplit("/", 1)[1]): v.state.name for v in listed}
        except exceptions.NotFound:
            return None

    def issued(self, cid: str = "c1") -> Secret | None:
        """What the issuer serves: the current version, read as the issuer does."""
        issuer = self.handle("issuer")
        stored = issuer.get_many([cid], pointers={cid: self.pointer(cid)})[cid]
        assert not isinstance(stored, BaseException), stored
        return stored.credential.access_token


def test_the_roles_name_permissions_secret_manager_has() -> None:
    """Every permission granted is one a Secret Manager method is checked against
    (https://cloud.google.com/secret-manager/docs/access-control): a misspelt permission
    would grant nothing and fail only in production."""
    for role in ("refresher_secrets", "issuer_secrets"):
        assert _role(role) <= set(PERMISSIONS.values()), role


def test_the_deployed_composition_is_the_pointer_protocol() -> None:
    """The roles are cut for the pointer protocol: the composition uses it whenever the state
    store holds the pointers, which the deployed one (Firestore) does."""
    assert issubclass(FirestoreStateStore, VersionPointers)


def test_refreshes_reads_and_removal_need_nothing_the_roles_leave_out(
    server: SecretManagerTestServer,
) -> None:
    deployment = Deployment(server)
    deployment.add()
    assert deployment.pointer() == 1
    served = {deployment.issued()}
    for n in range(2, 7):  # retention (3 versions) destroys from the fourth on
        summary = deployment.tick()
        assert summary.refreshed == 1, summary.to_json()
        assert deployment.pointer() == n
        served.add(deployment.issued())
    assert len(served) == 6  # each refresh's new access token, served at once
    assert deployment.states() == {
        **dict.fromkeys(range(1, 4), "DESTROYED"),
        4: "ENABLED",
        5: "ENABLED",
        6: "ENABLED",
    }
    # The connect function re-connects the account (new material on the current version).
    credential = Credential(
        refresh_token=Secret(deployment.provider.seed_refresh_token()),
        client_secret=Secret("client-secret"),
    )
    deployment.registry("connect").reconnect("c1", credential)
    assert deployment.pointer() == 7
    assert deployment.tick().refreshed == 1
    assert deployment.pointer() == 8
    # The CLI removes it: the secret goes with its record.
    deployment.registry("operator").remove("c1")
    assert deployment.states() is None


def test_a_crashed_writers_chain_is_read_and_built_on_with_the_roles(
    server: SecretManagerTestServer,
) -> None:
    """A refresher staged an answer (a rotated refresh token) and died before its commit:
    the issuer serves the staged answer, and the next tick builds on it and retires."""
    deployment = Deployment(server)
    deployment.add()
    deployment.tick()
    crashed = deployment.handle("refresher")
    current = crashed.get("c1")
    stored = Credential(
        refresh_token=Secret(deployment.provider.seed_refresh_token()),
        access_token=Secret("at-staged"),
        client_secret=Secret("client-secret"),
    )
    (staged,) = crashed.stage([SecretWrite("c1", stored, current.version, attempt="crashed")])
    assert staged == 3 and deployment.pointer() == 2
    assert deployment.issued() == Secret("at-staged")
    assert deployment.tick().refreshed == 1
    assert deployment.pointer() == 4
    assert (deployment.states() or {})[1] == "DESTROYED"


def test_a_losers_leftover_is_read_past_and_swept_with_the_roles(
    server: SecretManagerTestServer,
) -> None:
    """A writer that read version 2, then lost to a refresh, staged on 2 and died: the newest
    version descends from nothing current. Reading past it takes a list of the versions
    (the issuer's ``versions.list``); the next refresh sweeps it (list and destroy)."""
    deployment = Deployment(server)
    deployment.add()
    deployment.tick()
    stale = deployment.handle("connect")
    stale.get("c1")  # it read version 2 ...
    deployment.tick()  # ... a refresh made 3 current ...
    loser = Credential(refresh_token=Secret("rt-loser"), access_token=Secret("at-loser"))
    (leftover,) = stale.stage([SecretWrite("c1", loser, 2, attempt="stale")])  # ... and died
    assert isinstance(leftover, int)
    assert (leftover, deployment.pointer()) == (4, 3)
    served = deployment.issued()
    assert served not in {None, Secret("at-loser")}
    assert deployment.tick().refreshed == 1
    assert (deployment.states() or {})[leftover] == "DESTROYED"
    assert deployment.pointer() == 5


def test_a_stale_write_is_refused_and_its_version_destroyed_with_the_roles(
    server: SecretManagerTestServer,
) -> None:
    """The connect function re-connects on a version a refresh has just replaced: its write
    loses and its version is destroyed. The newest version is then unreadable (``latest``
    names it), so readers list the versions to find the pointer's, until the next refresh."""
    deployment = Deployment(server)
    deployment.add()
    stale = deployment.handle("connect")
    stale.get("c1")
    deployment.tick()
    served = deployment.issued()
    with pytest.raises(VersionConflict):
        stale.put("c1", Credential(refresh_token=Secret("rt-stale")), expected_version=1)
    assert deployment.pointer() == 2
    assert (deployment.states() or {})[3] == "DESTROYED"
    server.reset_calls()
    assert deployment.issued() == served
    assert server.calls["ListSecretVersions"] == 1
    assert deployment.tick().refreshed == 1
    assert deployment.pointer() == 4


@pytest.mark.parametrize("leftover", ["staged", "destroyed"])
def test_without_versions_list_a_reader_cannot_read_past_a_losers_version(
    server: SecretManagerTestServer, leftover: str
) -> None:
    """Why the issuer's role holds ``versions.list``: with ``versions.access`` alone (and
    ``secrets.get``, its role under the annotation protocol), a connection whose newest
    version is a loser's -- staged by a writer that died, or destroyed after a lost race --
    could not be read until the next refresh added a newer one."""
    server.restrict(
        "issuer-without-list", {"secretmanager.secrets.get", "secretmanager.versions.access"}
    )
    deployment = Deployment(server)
    deployment.add()
    stale = deployment.handle("connect")
    stale.get("c1")
    deployment.tick()
    credential = Credential(refresh_token=Secret("rt-x"))
    if leftover == "staged":
        stale.stage([SecretWrite("c1", credential, 1, attempt="x")])
    else:
        with pytest.raises(VersionConflict):
            stale.put("c1", credential, expected_version=1)
    reader = deployment.handle("issuer-without-list")
    with pytest.raises(PermissionDenied):
        reader.get_many(["c1"], pointers={"c1": deployment.pointer()})
    assert deployment.issued() is not None  # the module's issuer role reads it
