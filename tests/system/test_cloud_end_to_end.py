"""The refresher as deployed on the cloud backends, end to end.

A real ``functions-framework`` process runs ``functions/refresher/main.py`` with
``TOKENBROKER_BACKEND=gcp`` (Secret Manager test server, Firestore emulator, Pub/Sub emulator)
or ``aws`` (AWS Secrets Manager on moto, Firestore, Pub/Sub), against oidc-provider with
rotating refresh tokens and 3-second access tokens. Scheduler-style CloudEvents trigger ticks;
a real streaming subscriber collects the events.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.emulators import emulator
from tests.support.oidc import (
    CC_POST_ID,
    CC_POST_SECRET,
    RT_BASIC_ID,
    RT_BASIC_SECRET,
    OidcServer,
    start_oidc_server,
)
from tests.system.helpers import registry
from tests.system.processes import REPO, functions_framework
from tests.system.test_refresher_function import _scheduler_event
from tests.unit.kernel.test_event_schema import validate as validate_event
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "refresher" / "main.py"
TTL = 3


@pytest.fixture(scope="module")
def short_oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    server = start_oidc_server(tmp_path_factory, access_token_ttl=TTL)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secret_manager() -> Iterator[Any]:
    from tests.support.secretmanager_server import SecretManagerTestServer

    server = SecretManagerTestServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def monitoring() -> Iterator[Any]:
    from tests.support.monitoring_server import MonitoringTestServer

    with MonitoringTestServer() as server:
        yield server


@dataclass
class Cloud:
    """One isolated deployment: its own project, topic, subscription and settings."""

    backend: str
    env: dict[str, str]
    runtime: Runtime
    subscription: str
    received: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(m.data) for m in self.received]


@pytest.fixture(params=["gcp", "aws"])
def cloud(request: pytest.FixtureRequest, secret_manager: Any, monitoring: Any) -> Iterator[Cloud]:
    emulator("firestore")
    emulator("pubsub")
    from google.cloud import pubsub_v1

    project = f"tb-e2e-{uuid.uuid4().hex[:10]}"
    env = {
        "TOKENBROKER_BACKEND": request.param,
        "TOKENBROKER_GCP_PROJECT": project,
        "TOKENBROKER_PUBSUB_TOPIC": "tokenbroker-events",
        "TOKENBROKER_RETAINED_VERSIONS": "2",
        "TOKENBROKER_SECRET_MANAGER_ENDPOINT": secret_manager.address,
        "TOKENBROKER_MONITORING_ENDPOINT": monitoring.address,
        "TOKENBROKER_RETRY_BASE_DELAY_SECONDS": "0.05",
    }
    if request.param == "aws":
        from tests.support.moto_server import moto_endpoint

        env.update(
            TOKENBROKER_AWS_ENDPOINT_URL=moto_endpoint(),
            TOKENBROKER_AWS_REGION="us-east-1",
            TOKENBROKER_AWS_SECRET_PREFIX=f"{project}/",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
        )
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, "tokenbroker-events")
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(project, "e2e-" + uuid.uuid4().hex[:8])
    subscriber.create_subscription(
        request={"name": subscription, "topic": topic, "enable_message_ordering": True}
    )
    runtime = build_runtime(Settings.from_env())
    deployment = Cloud(request.param, env, runtime, subscription)

    def on_message(message: Any) -> None:
        with deployment.lock:
            deployment.received.append(message)
        message.ack()

    streaming = subscriber.subscribe(subscription, callback=on_message)
    try:
        yield deployment
    finally:
        streaming.cancel()
        runtime.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _register(cloud: Cloud, oidc: OidcServer, n_refresh: int) -> list[str]:
    reg = registry(cloud.runtime)
    ids = []
    for i in range(n_refresh):
        tokens = oidc.obtain_refresh_token(RT_BASIC_ID, RT_BASIC_SECRET)
        cid = f"crm-{i}"
        reg.register(
            Connection(
                id=cid,
                profile="generic",
                grant=GrantType.REFRESH_TOKEN,
                client_id=RT_BASIC_ID,
                token_url=oidc.token_url,
                auth_method=ClientAuthMethod.BASIC,
            ),
            Credential(
                refresh_token=Secret(tokens["refresh_token"]), client_secret=Secret(RT_BASIC_SECRET)
            ),
        )
        ids.append(cid)
    reg.register(
        Connection(
            id="svc",
            profile="generic",
            grant=GrantType.CLIENT_CREDENTIALS,
            client_id=CC_POST_ID,
            scopes=("api:read",),
            token_url=oidc.token_url,
            auth_method=ClientAuthMethod.POST,
        ),
        Credential(client_secret=Secret(CC_POST_SECRET)),
    )
    return [*ids, "svc"]


def _wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _secret_manager_states(secret_manager: Any, cloud: Cloud, cid: str) -> dict[int, str]:
    client = secret_manager.client()
    parent = f"projects/{cloud.env['TOKENBROKER_GCP_PROJECT']}/secrets/tokenbroker-{cid}"
    return {
        int(v.name.rsplit("/", 1)[1]): v.state.name
        for v in client.list_secret_versions(request={"parent": parent})
    }


def test_scheduled_ticks_rotate_into_the_cloud_stores(
    cloud: Cloud, short_oidc: OidcServer, secret_manager: Any, monitoring: Any, tmp_path: Path
) -> None:
    short_oidc.reset_stats()
    ids = _register(cloud, short_oidc, n_refresh=3)
    with functions_framework("refresh", SOURCE, cloud.env, name=f"e2e-{cloud.backend}") as url:
        headers, body = _scheduler_event()
        assert httpx.post(url, headers=headers, content=body, timeout=60).status_code == 200
        for cid in ids:
            assert cloud.runtime.secrets.get(cid).version >= 2
        # Every version-2 access token has now expired; and the API takes one point per
        # series every 5 s, so the second tick's metrics are written too.
        time.sleep(max(TTL + 0.5, 5.5))
        headers, body = _scheduler_event()
        assert httpx.post(url, headers=headers, content=body, timeout=60).status_code == 200

    current = {cid: cloud.runtime.secrets.get(cid) for cid in ids}
    for cid, stored in current.items():
        record = cloud.runtime.state.get(cid)
        assert record.state.current_version == stored.version
        assert record.state.status.value == "active"
        assert stored.credential.access_token is not None
    stats = short_oidc.stats()
    assert stats["invalid_grant"] == 0
    assert stats["token_requests_by_grant_type"]["refresh_token"] == 6

    # Exactly the expected events: two rotations per connection, in version order.
    expected = len(ids) * 2
    _wait_for(lambda: len(cloud.events()) >= expected, what=f"{expected} events")
    time.sleep(1.0)  # nothing more arrives
    events = cloud.events()
    unique = {e["idempotency_key"]: e for e in events}
    assert len(unique) == expected
    for cid in ids:
        mine = [e for e in events if e["connection_id"] == cid]
        assert [e["type"] for e in mine] == ["credential.rotated"] * 2
        assert [e["version"] for e in mine] == sorted(e["version"] for e in mine)
        assert mine[-1]["version"] == current[cid].version
    for message in cloud.received:
        assert message.attributes["type"] == "credential.rotated"
        assert message.ordering_key == message.attributes["connection"]
    for event in events:
        validate_event(event)

    # Nothing in any event is token material.
    issued = short_oidc.ledger_tokens()
    raw = (
        b"".join(m.data for m in cloud.received)
        + json.dumps([dict(m.attributes) for m in cloud.received]).encode()
    )
    assert [t for t in issued if t.encode() in raw] == []

    _assert_tick_metrics(monitoring, cloud, ids)

    if cloud.backend == "gcp":
        # The pointer protocol (docs/gcp.md): v1 (registration) destroyed by retention (2)
        # when v3 was promoted, v2 kept readable with it (nothing is disabled any more), v3
        # current -- and the state record points at v3.
        for cid in ids:
            states = _secret_manager_states(secret_manager, cloud, cid)
            assert states == {1: "DESTROYED", 2: "ENABLED", 3: "ENABLED"}, (cid, states)
    else:
        import boto3

        client = boto3.client(
            "secretsmanager",
            endpoint_url=cloud.env["TOKENBROKER_AWS_ENDPOINT_URL"],
            region_name="us-east-1",
        )
        for cid in ids:
            name = f"{cloud.env['TOKENBROKER_AWS_SECRET_PREFIX']}{cid}"
            listed = client.list_secret_version_ids(SecretId=name)["Versions"]
            stages = sorted(s for v in listed for s in v.get("VersionStages", []))
            assert "AWSCURRENT" in stages and "AWSPREVIOUS" in stages
            assert "AWSPENDING" not in stages


def test_two_refreshers_at_the_same_moment_refresh_each_connection_once(
    cloud: Cloud, short_oidc: OidcServer
) -> None:
    ids = _register(cloud, short_oidc, n_refresh=12)
    short_oidc.reset_stats()
    with (
        functions_framework("refresh_http", SOURCE, cloud.env, name=f"race-a-{cloud.backend}") as a,
        functions_framework("refresh_http", SOURCE, cloud.env, name=f"race-b-{cloud.backend}") as b,
    ):
        barrier = threading.Barrier(2)

        def tick(url: str) -> dict[str, Any]:
            barrier.wait()
            response = httpx.post(url, json={}, timeout=120)
            assert response.status_code == 200, response.text
            return dict(response.json())

        with ThreadPoolExecutor(2) as pool:
            summaries = list(pool.map(tick, [a, b]))
    refreshed = sum(s["refreshed"] for s in summaries)
    assert refreshed == len(ids), summaries
    stats = short_oidc.stats()
    assert stats["invalid_grant"] == 0
    assert stats["token_requests_by_grant_type"].get("refresh_token", 0) == len(ids) - 1
    for cid in ids:
        assert cloud.runtime.secrets.get(cid).version == 2


def _assert_tick_metrics(monitoring: Any, cloud: Cloud, ids: list[str]) -> None:
    """The documented series (docs/operations.md), as the refresher function wrote them to the
    Monitoring test server through the official client: one point per tick."""
    from tokenbroker.kernel.metrics import PREFIX, REFRESH_OUTCOMES

    project = cloud.env["TOKENBROKER_GCP_PROJECT"]

    def series(name: str) -> dict[tuple[str, ...], Any]:
        found = monitoring.series(project, PREFIX + name)
        return {tuple(sorted(s.metric_labels.items())): s for s in found}

    ticks = series("refresh/ticks")
    assert list(ticks) == [(("result", "ok"),)]
    (tick,) = ticks.values()
    assert [p.value for p in tick.points] == [1, 2]
    resource = tick.resource_labels
    assert (resource["project_id"], resource["job"]) == (project, "refresher")
    assert (resource["namespace"], resource["location"]) == ("tokenbroker", "global")
    assert resource["task_id"]
    assert tick.points[0].start_time == tick.points[1].start_time  # one process: one count

    outcomes = {labels[0][1]: s for labels, s in series("refresh/outcomes").items()}
    assert set(outcomes) == set(REFRESH_OUTCOMES)
    assert [p.value for p in outcomes["rotated"].points] == [len(ids), 2 * len(ids)]
    for outcome in set(REFRESH_OUTCOMES) - {"rotated"}:
        assert [p.value for p in outcomes[outcome].points] == [0, 0], outcome

    latency = {
        dict(labels)["grant"]: s for labels, s in series("refresh/acquisition_latency").items()
    }
    assert set(latency) == {"refresh_token", "client_credentials"}
    assert [p.value.count for p in latency["refresh_token"].points] == [3, 6]
    assert [p.value.count for p in latency["client_credentials"].points] == [1, 2]
    assert all(dict(labels)["provider"] == "generic"
               for labels in series("refresh/acquisition_latency"))  # fmt: skip

    connections = {labels[0][1]: s for labels, s in series("fleet/connections").items()}
    assert connections["active"].points[-1].value == len(ids)
    assert connections["needs_reauth"].points[-1].value == 0
    (budget,) = series("fleet/outage_budget_seconds").values()
    assert 0 < budget.points[0].value <= TTL
    expiry = {labels[0][1]: s for labels, s in series("connection/seconds_to_expiry").items()}
    assert set(expiry) == set(ids)
    failures = series("connection/consecutive_failures")
    assert {s.points[-1].value for s in failures.values()} == {0}
