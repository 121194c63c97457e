"""SIGKILL at each step boundary of a refresh, against oidc-provider (which rotates refresh
tokens and revokes the grant when a used one comes back), on the embedded backend and on the
gcp one (Secret Manager test server, Firestore and Pub/Sub emulators; aws at the points where
its pointer protocol differs).

The refresher is the real ``tokenbroker`` command, killed by its own failpoint
(``TOKENBROKER_FAILPOINTS``, ``kernel/failpoints.py``) at the first pass of each boundary; then
a clean refresher takes over. Nothing may be lost: no ``invalid_grant``, no connection needing
re-authorisation, every committed version announced. A kill with a request on the wire leaves
connections *at risk* (their access tokens still served), never presented again blindly.
(The fault-suite harness runs this at scale, with figures; this is the protocol's own proof.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import save_output
from tests.support.chaos import KILL_POINTS
from tests.support.emulators import emulator
from tests.support.oidc import RT_BASIC_ID, RT_BASIC_SECRET, OidcServer
from tests.system.helpers import add_refresh_connection, outbox, tick
from tests.system.processes import BIN
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import ClientAuthMethod, ConnectionStatus, EventType

pytestmark = pytest.mark.system

IDS = ["c0", "c1", "c2"]
LEASE_TTL = 20  # seconds: the shortest the settings allow
POINTS = KILL_POINTS  # every step boundary of a refresh


@dataclass
class Deployment:
    """One isolated backend: the settings a refresher process gets, and how to read back the
    events it announced."""

    env: dict[str, str]
    announced: Callable[[Runtime], set[tuple[str, int]]]

    def runtime(self) -> Runtime:
        return build_runtime(Settings.from_env({**os.environ, **self.env}))


def _rotated(events: list[Any]) -> set[tuple[str, int]]:
    return {(e.connection_id, e.version) for e in events if e.type is EventType.ROTATED}


@pytest.fixture(scope="module")
def secret_manager() -> Iterator[Any]:
    from tests.support.secretmanager_server import SecretManagerTestServer

    server = SecretManagerTestServer().start()
    yield server
    server.stop()


def _deployment(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Deployment:
    base = {
        "TOKENBROKER_LEASE_TTL_SECONDS": str(LEASE_TTL),
        "TOKENBROKER_HTTP_TIMEOUT": "5",
        "TOKENBROKER_RETRY_BASE_DELAY_SECONDS": "0.05",
    }
    if backend == "embedded":
        env = {**base, "TOKENBROKER_BACKEND": "embedded", "TOKENBROKER_STATE_DIR": str(tmp_path)}
        return Deployment(env, lambda runtime: _rotated(outbox(runtime)))
    emulator("firestore")
    emulator("pubsub")
    from google.api_core.exceptions import DeadlineExceeded
    from google.cloud import pubsub_v1

    from tokenbroker.consumer.subscriber import parse_message

    project = f"tb-crash-{uuid.uuid4().hex[:10]}"
    sm = request.getfixturevalue("secret_manager")
    env = {
        **base,
        "TOKENBROKER_BACKEND": backend,
        "TOKENBROKER_GCP_PROJECT": project,
        "TOKENBROKER_PUBSUB_TOPIC": "tokenbroker-events",
        "TOKENBROKER_SECRET_MANAGER_ENDPOINT": sm.address,
        "TOKENBROKER_METRICS": "off",
    }
    if backend == "aws":
        from tests.support.moto_server import moto_endpoint

        env.update(
            TOKENBROKER_AWS_ENDPOINT_URL=moto_endpoint(),
            TOKENBROKER_AWS_REGION="us-east-1",
            TOKENBROKER_AWS_SECRET_PREFIX=f"{project}/",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
        )
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # boto3 reads them itself
            monkeypatch.setenv(name, env[name])
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, "tokenbroker-events")
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(project, "crash")
    subscriber.create_subscription(request={"name": subscription, "topic": topic})
    seen: list[Any] = []

    def announced(_: Runtime) -> set[tuple[str, int]]:
        while True:  # until a pull comes back empty
            try:
                answer = subscriber.pull(
                    request={"subscription": subscription, "max_messages": 1000},
                    timeout=2.0,
                    retry=None,
                )
            except DeadlineExceeded:
                break
            if not answer.received_messages:
                break
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [m.ack_id for m in answer.received_messages],
                }
            )
            seen.extend(parse_message(m.message) for m in answer.received_messages)
        return _rotated(seen)

    return Deployment(env, announced)


CASES = [("embedded", p) for p in POINTS] + [("gcp", p) for p in POINTS]
CASES += [("aws", "secret.written"), ("aws", "state.committed")]


@dataclass
class Crash:
    """One case after its kill: the deployment, and when the killed holder died."""

    deployment: Deployment
    killed_at: float


@pytest.fixture(scope="module")
def crashes(
    tmp_path_factory: pytest.TempPathFactory,
    oidc_server: OidcServer,
    request: pytest.FixtureRequest,
) -> Iterator[dict[tuple[str, str], Crash]]:
    """Every case's deployment, seeded and refreshed once, then its refresher killed at the
    case's failpoint -- all before any case waits out the dead holder's leases, so the cases
    share one wait instead of one each."""
    found: dict[tuple[str, str], Crash] = {}
    oidc_server.clear_faults()
    oidc_server.reset_stats()  # the session's server: other modules' refusals are not ours
    with pytest.MonkeyPatch.context() as monkeypatch:
        for backend, point in CASES:
            state = tmp_path_factory.mktemp(f"crash-{backend}-{_slug(point)}") / "state"
            deployment = _deployment(backend, state, request, monkeypatch)
            killed_at = _seed_and_kill(deployment, oidc_server, point)
            found[(backend, point)] = Crash(deployment, killed_at)
        assert oidc_server.stats()["invalid_grant"] == 0  # no kill made a holder replay anything
        yield found


def _slug(point: str) -> str:
    return point.replace(".", "-")


def _seed_and_kill(deployment: Deployment, oidc: OidcServer, point: str) -> float:
    backend = deployment.env["TOKENBROKER_BACKEND"]
    runtime = deployment.runtime()
    try:
        for cid in IDS:
            add_refresh_connection(
                runtime, oidc, cid, client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
                auth_method=ClientAuthMethod.BASIC,
            )  # fmt: skip
        assert tick(runtime).refreshed == len(IDS)  # each serves a fresh access token now
    finally:
        runtime.close()
    env = {**os.environ, **deployment.env, "TOKENBROKER_FAILPOINTS": point}
    env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
    killed = subprocess.run(
        [str(BIN / "tokenbroker"), "refresh", "--all"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    save_output(f"crash-{backend}-{point}", killed.stdout, killed.stderr)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return time.monotonic()


@pytest.mark.parametrize(("backend", "point"), CASES)
def test_a_kill_at_each_step_boundary_loses_no_connection(
    crashes: dict[tuple[str, str], Crash], oidc: OidcServer, backend: str, point: str
) -> None:
    crash = crashes[(backend, point)]
    deployment = crash.deployment
    oidc.reset_stats()
    # The dead holder's leases (those of the connections it had not committed yet) expire by
    # the store's clock; until then the stores already hold whatever it made durable.
    time.sleep(max(0.0, crash.killed_at + LEASE_TTL + 1 - time.monotonic()))
    runtime = deployment.runtime()
    try:
        after = tick(runtime, connection_ids=IDS)
        tick(runtime)  # and a plain tick: relays whatever is still parked
        records = {r.connection.id: r.state for r in runtime.state.list()}
        stats = oidc.stats()
        assert stats["invalid_grant"] == 0, (point, stats, after.to_json())
        for cid, state in records.items():
            assert state.status is ConnectionStatus.ACTIVE, (point, cid, state)
            stored = runtime.secrets.get(cid)
            assert stored.version == state.current_version, (point, cid)
            if state.at_risk:
                # Only a kill with a request (possibly) on the wire leaves that, and the
                # connection still serves its unexpired access token.
                # (With several workers, a kill after a commit may catch the next request on
                # the wire too.)
                assert point != "lease.claimed", (point, cid)
                assert state.intent is not None and stored.version == 2
                assert stored.credential.expires_at is not None
            else:
                # Refreshed (the tokens live 5 minutes: the plain tick may refresh again).
                assert stored.version >= 3, (point, cid, state)
        if point == "lease.claimed":
            assert not any(s.at_risk for s in records.values()), point
        if point == "secret.written":
            assert any(not s.at_risk for s in records.values())  # the staged one, settled
        # Every committed version was announced (no crash point loses an event).
        assert runtime.state.parked_events(1000) == []  # the outbox was relayed
        announced = deployment.announced(runtime)
        for cid, s in records.items():
            assert s.current_version is not None
            for version in range(2, s.current_version + 1):
                assert (cid, version) in announced, (point, cid, version)
        # And the tokens those hold are alive: one more forced refresh of them works.
        alive = [cid for cid, s in records.items() if not s.at_risk]
        if alive:
            assert tick(runtime, connection_ids=alive).refreshed == len(alive)
        assert oidc.stats()["invalid_grant"] == 0
    finally:
        runtime.close()
