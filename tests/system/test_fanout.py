"""Fan-out on the real parts: the refresher publishes shards, concurrent workers refresh each
connection exactly once (docs/gcp.md, "Fan-out").

Real ``functions-framework`` processes serve ``functions/refresher/main.py``: one as the
scheduled refresher (``refresh_http`` with ``TOKENBROKER_FANOUT_SHARDS``), three as workers
(``refresh``, the CloudEvent entry point the worker function deploys), on the Firestore and
Pub/Sub emulators and the Secret Manager test server, against a provider that rotates refresh
tokens and revokes a grant whose consumed token is presented again. Every worker may claim the
whole due set (``TOKENBROKER_TICK_LIMIT`` = all of it): what keeps them apart is the shard each
one's message names (a worker claims only its shard's connections), and within a shard, the
lease (a shard delivered twice at once).
"""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import functions_framework
import httpx
import pytest

from tests.support.emulators import emulator
from tests.support.provider_api import ProviderApi
from tests.system.processes import REPO
from tests.system.processes import functions_framework as function_process
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.entrypoints import refresher
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import Connection, Credential, GrantType, Shard
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "refresher" / "main.py"
CONNECTIONS = 90
WORKERS = 3
FANOUT_TOPIC = "tokenbroker-fanout"


@dataclass
class Deployment:
    env: dict[str, str]
    runtime: Runtime
    api: ProviderApi
    token_server: FakeTokenServer
    subscriber: Any
    fanout_subscription: str
    ids: list[str]

    def presented(self) -> list[str]:
        """The refresh tokens presented to the provider so far, in order."""
        tokens = []
        for received in self.api.received:
            form = parse_qs(received.body.decode())
            if form.get("grant_type") == ["refresh_token"]:
                tokens.extend(form["refresh_token"])
        return tokens


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    emulator("firestore")
    emulator("pubsub")
    from google.cloud import pubsub_v1

    from tests.support.secretmanager_server import SecretManagerTestServer

    secret_manager = SecretManagerTestServer().start()
    token_server = FakeTokenServer()
    project = f"tb-fanout-{uuid.uuid4().hex[:10]}"
    env = {
        "TOKENBROKER_BACKEND": "gcp",
        "TOKENBROKER_GCP_PROJECT": project,
        "TOKENBROKER_PUBSUB_TOPIC": "tokenbroker-events",
        "TOKENBROKER_SECRET_MANAGER_ENDPOINT": secret_manager.address,
        "TOKENBROKER_METRICS": "off",
        "TOKENBROKER_RETRY_BASE_DELAY_SECONDS": "0.05",
        "TOKENBROKER_TICK_LIMIT": str(CONNECTIONS),
        "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE": "100000",
        "FIRESTORE_EMULATOR_HOST": os.environ["FIRESTORE_EMULATOR_HOST"],
        "PUBSUB_EMULATOR_HOST": os.environ["PUBSUB_EMULATOR_HOST"],
    }
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    for topic in ("tokenbroker-events", FANOUT_TOPIC):
        publisher.create_topic(name=publisher.topic_path(project, topic))
    subscription = subscriber.subscription_path(project, "fanout-" + uuid.uuid4().hex[:8])
    subscriber.create_subscription(
        request={"name": subscription, "topic": publisher.topic_path(project, FANOUT_TOPIC)}
    )
    runtime = build_runtime(Settings.from_env(env))
    with ProviderApi(token_server=token_server).in_thread() as api:
        registry = runtime.registry()
        ids = [f"c{i:03d}" for i in range(CONNECTIONS)]
        for cid in ids:
            registry.register(
                Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                           client_id="client", token_url=f"{api.url}/oauth/token"),
                Credential(refresh_token=Secret(token_server.seed_refresh_token()),
                           client_secret=Secret("client-secret")),
            )  # fmt: skip
        try:
            yield Deployment(env, runtime, api, token_server, subscriber, subscription, ids)
        finally:
            runtime.close()
            subscriber.close()
            secret_manager.stop()


def _shard_messages(deployment: Deployment, expected: int) -> list[bytes]:
    messages: list[bytes] = []
    for _ in range(20):
        if len(messages) >= expected:
            break
        response = deployment.subscriber.pull(
            request={"subscription": deployment.fanout_subscription, "max_messages": 10},
            timeout=10,
        )
        if response.received_messages:
            messages.extend(m.message.data for m in response.received_messages)
            deployment.subscriber.acknowledge(
                request={
                    "subscription": deployment.fanout_subscription,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
    return messages


def _eventarc_delivery(data: bytes) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent as Eventarc pushes a Pub/Sub message to the worker."""
    body = {
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": uuid.uuid4().hex,
            "publishTime": "2026-12-04T02:00:00Z",
        },
        "subscription": "projects/p/subscriptions/eventarc-fanout",
    }
    headers = {
        "ce-id": str(uuid.uuid4()),
        "ce-specversion": "1.0",
        "ce-source": f"//pubsub.googleapis.com/projects/p/topics/{FANOUT_TOPIC}",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "Content-Type": "application/json",
    }
    return headers, json.dumps(body).encode()


def test_concurrent_workers_refresh_every_connection_exactly_once(
    deployment: Deployment,
) -> None:
    fanout_env = {
        **deployment.env,
        refresher.ENV_FANOUT_SHARDS: str(WORKERS),
        refresher.ENV_FANOUT_TOPIC: FANOUT_TOPIC,
    }
    with ExitStack() as stack:
        dispatcher = stack.enter_context(
            function_process("refresh_http", SOURCE, fanout_env, name="fanout-refresher")
        )
        workers = [
            stack.enter_context(
                function_process("refresh", SOURCE, deployment.env, name=f"fanout-worker-{i}")
            )
            for i in range(WORKERS)
        ]
        # A third of the records predate the slot field: the scheduled call must give them
        # one before any worker's sharded claim could find them.
        from google.cloud import firestore

        legacy = deployment.ids[::3]
        for cid in legacy:
            deployment.runtime.state._doc(cid).update(
                {"slot": firestore.DELETE_FIELD, "bucket": firestore.DELETE_FIELD}
            )  # type: ignore[attr-defined]
        answer = httpx.post(dispatcher, content=b"{}", timeout=60)
        assert answer.status_code == 200, answer.text
        project = deployment.env["TOKENBROKER_GCP_PROJECT"]
        assert answer.json() == {
            "fanned_out": WORKERS,
            "shards": WORKERS,
            "topic": f"projects/{project}/topics/{FANOUT_TOPIC}",
        }
        assert deployment.presented() == []  # the scheduled tick refreshes nothing itself

        messages = _shard_messages(deployment, WORKERS)
        messages.sort(key=lambda m: json.loads(m)["shard"])
        shards = [json.loads(m) for m in messages]
        assert shards == [{"shard": i, "shards": WORKERS} for i in range(WORKERS)]

        def deliver(url_and_data: tuple[str, bytes]) -> httpx.Response:
            headers, body = _eventarc_delivery(url_and_data[1])
            return httpx.post(url_and_data[0], headers=headers, content=body, timeout=120)

        def versions() -> dict[str, int]:
            stored = deployment.runtime.secrets.get_many(deployment.ids)
            return {cid: stored[cid].version for cid in deployment.ids}

        # Shard 0 alone: exactly the connections it holds are refreshed, legacy ones included.
        first = Shard(0, WORKERS)
        assert deliver((workers[0], messages[0])).status_code == 200
        assert versions() == {cid: 2 if first.holds(cid) else 1 for cid in deployment.ids}
        assert any(first.holds(cid) for cid in legacy)

        # The other shards on their workers, and shard 0 again beside them (redelivered): the
        # lease keeps the duplicate from taking anything twice.
        deliveries = [*zip(workers[1:], messages[1:], strict=True), (workers[0], messages[0])]
        with ThreadPoolExecutor(WORKERS) as pool:
            answers = list(pool.map(deliver, deliveries))
        assert [a.status_code for a in answers] == [200] * WORKERS, [a.text for a in answers]

        presented = deployment.presented()
        assert len(presented) == CONNECTIONS
        assert len(set(presented)) == CONNECTIONS  # no refresh token presented twice
        stored = deployment.runtime.secrets.get_many(deployment.ids)
        assert {cid: stored[cid].version for cid in deployment.ids} == dict.fromkeys(
            deployment.ids, 2
        )
        for cid in deployment.ids:
            token = stored[cid].credential.refresh_token
            assert token is not None
            assert deployment.token_server.grant_alive(token.reveal()), cid

        # A shard delivered again (Pub/Sub is at-least-once) finds nothing due.
        again = deliver((workers[0], messages[0]))
        assert again.status_code == 200, again.text
        assert len(deployment.presented()) == CONNECTIONS


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        ({refresher.ENV_FANOUT_SHARDS: "many"}, refresher.ENV_FANOUT_SHARDS),
        ({refresher.ENV_FANOUT_SHARDS: "3"}, refresher.ENV_FANOUT_TOPIC),
    ],
)
def test_a_bad_fanout_setting_is_an_invalid_config_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], named: str
) -> None:
    runtime = build_runtime(Settings(backend="memory"))
    monkeypatch.setattr(refresher, "_runtime", runtime)
    monkeypatch.setattr(refresher, "_fanout", refresher._UNREAD)
    monkeypatch.delenv(refresher.ENV_FANOUT_TOPIC, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    app = functions_framework.create_app("refresh_http", str(SOURCE)).test_client()
    answer = app.post("/", data=b"{}")
    assert answer.status_code == 500
    body = answer.get_json()
    assert body["error"] == "invalid_config"
    assert named in json.dumps(body)


def test_a_malformed_shard_is_refused_not_fanned_out_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runtime = build_runtime(Settings(backend="memory"))
    monkeypatch.setattr(refresher, "_runtime", runtime)
    monkeypatch.setattr(refresher, "_fanout", refresher._UNREAD)
    monkeypatch.setenv(refresher.ENV_FANOUT_SHARDS, "4")
    monkeypatch.setenv(refresher.ENV_FANOUT_TOPIC, "projects/p/topics/t")
    app = functions_framework.create_app("refresh_http", str(SOURCE)).test_client()
    answer = app.post("/", data=json.dumps({"shard": 4, "shards": 4}).encode())
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "invalid_request"
