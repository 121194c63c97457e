"""Which adapters the contract suites run against: one entry per adapter and port.

Adding an adapter (Secret Manager, Firestore, Pub/Sub, AWS Secrets Manager, ...) is one entry
in the matching dict below; every test of that port's suite then runs against it too.

An entry's ``open`` gets a :class:`Workspace` (a private directory, a place to register
clean-up, a per-test memo) and returns a *handle* on the port. Each call of ``open`` with the
same workspace must return a handle on the **same** underlying storage: for a networked or
file-backed adapter a new, independent client (a second "process"); for the in-memory adapters,
which have no storage outside the object, the same object again. The suites use this to check
that writes are visible to other handles and that races between handles are safe.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tokenbroker.adapters.embedded import (
    EmbeddedAuthorizationSessions,
    EmbeddedDatabase,
    EmbeddedOutbox,
    EmbeddedSecretStore,
    EmbeddedStateStore,
)
from tokenbroker.adapters.memory import (
    MemoryAuthorizationSessions,
    MemoryEventBus,
    MemorySecretStore,
    MemoryStateStore,
    MemoryVersionPointers,
)
from tokenbroker.kernel.model import ConnectionEvent
from tokenbroker.ports import AuthorizationSessions, EventBus, SecretStore, StateStore

from .builders import ManualClock
from .endpoint_rigs import AiohttpServerRig, EndpointRig, FakeTokenServerRig

T = TypeVar("T")


class Workspace:
    """Per-test resources for adapter factories. ``lease_clock`` is the clock every state
    store handle of the test keeps its leases on."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lease_clock = ManualClock()
        self._stack = ExitStack()
        self._memo: dict[str, Any] = {}

    def on_close(self, callback: Callable[[], object]) -> None:
        self._stack.callback(callback)

    def once(self, key: str, make: Callable[[], T]) -> T:
        """``make()`` the first time ``key`` is asked for in this workspace, then the same."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]  # type: ignore[no-any-return]

    def close(self) -> None:
        self._stack.close()


# --- shared helpers for the embedded adapter -----------------------------------------------


def _embedded_db(ws: Workspace) -> EmbeddedDatabase:
    """A new EmbeddedDatabase (own SQLite connection) on the workspace's state directory."""
    db = EmbeddedDatabase(ws.directory / "embedded-state")
    ws.on_close(db.close)
    return db


# --- SecretStore ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SecretStoreAdapter:
    #: ``open(ws, retained_versions)``; ``None`` means "the adapter's default" (3).
    open: Callable[[Workspace, int | None], SecretStore]
    #: Damage the current version of a connection behind the adapter's back, as disk rot or
    #: tampering would (``None``: the adapter keeps nothing that can rot, e.g. memory).
    corrupt: Callable[[Workspace, SecretStore, str], None] | None = None


def _memory_secrets(ws: Workspace, retained: int | None) -> SecretStore:
    kwargs = {} if retained is None else {"retained_versions": retained}
    return ws.once("memory-secrets", lambda: MemorySecretStore(**kwargs))


def _embedded_secrets(ws: Workspace, retained: int | None) -> SecretStore:
    kwargs = {} if retained is None else {"retained_versions": retained}
    return EmbeddedSecretStore(_embedded_db(ws), **kwargs)


_secret_manager_server: Any = None


def _secret_manager(ws: Workspace, retained: int | None) -> SecretStore:
    """Secret Manager on the gRPC test server (one per test process), a project per test."""
    global _secret_manager_server  # noqa: PLW0603 - one server for the test process
    import atexit

    from tests.support.secretmanager_server import SecretManagerTestServer
    from tokenbroker.adapters.gcp.secret_manager import SecretManagerSecretStore

    if _secret_manager_server is None:
        _secret_manager_server = SecretManagerTestServer().start()
        atexit.register(_secret_manager_server.stop)
    project = ws.once("sm-project", lambda: f"tb-test-{uuid.uuid4().hex[:12]}")
    kwargs = {} if retained is None else {"retained_versions": retained}
    return SecretManagerSecretStore(
        project=project, endpoint=_secret_manager_server.address, **kwargs
    )


def _secret_manager_pointed(ws: Workspace, retained: int | None) -> SecretStore:
    """Secret Manager's pointer protocol on the gRPC test server, the pointers in one book per
    test shared by every handle (as the state store is)."""
    from tokenbroker.adapters.gcp.secret_manager import SecretManagerSecretStore
    from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore

    plain = _secret_manager(ws, retained)
    assert isinstance(plain, SecretManagerSecretStore)
    return PointedSecretManagerStore(
        project=plain.project,
        endpoint=plain._endpoint,
        retained_versions=plain.retained_versions,
        pointers=ws.once("sm-pointers", MemoryVersionPointers),
    )


def _aws_secrets(ws: Workspace, retained: int | None) -> SecretStore:
    """AWS Secrets Manager on moto (one server per test process), a name prefix per test;
    each call is a new boto3 client. The workspace's secrets are deleted when it closes."""
    import uuid

    from tests.support.moto_server import delete_secrets_with_prefix, moto_client
    from tokenbroker.adapters.aws import AwsSecretsManagerStore

    def new_prefix() -> str:
        prefix = f"tb-test-{uuid.uuid4().hex[:12]}/"
        ws.on_close(lambda: delete_secrets_with_prefix(prefix))
        return prefix

    prefix = ws.once("aws-prefix", new_prefix)
    kwargs = {} if retained is None else {"retained_versions": retained}
    return AwsSecretsManagerStore(moto_client(), prefix=prefix, **kwargs)


def _corrupt_embedded(ws: Workspace, store: SecretStore, cid: str) -> None:
    """Flip the last bit of the current version's sealed blob (the AES-GCM tag)."""
    import sqlite3

    with sqlite3.connect(ws.directory / "embedded-state" / "tokenbroker.db") as raw:
        (version, sealed) = raw.execute(
            "SELECT v.version, v.sealed FROM secret_versions v JOIN secrets s ON"
            " s.connection_id = v.connection_id AND s.current_version = v.version"
            " WHERE v.connection_id = ?",
            (cid,),
        ).fetchone()
        raw.execute(
            "UPDATE secret_versions SET sealed = ? WHERE connection_id = ? AND version = ?",
            (sealed[:-1] + bytes([sealed[-1] ^ 1]), cid, version),
        )


def _corrupt_secret_manager(ws: Workspace, store: SecretStore, cid: str) -> None:
    """A new version whose payload (with a correct checksum) is not a credential, made
    current through the annotations, as a buggy or hostile writer would."""
    import google_crc32c

    from tokenbroker.adapters.gcp.secret_manager import CURRENT, SecretManagerSecretStore

    assert isinstance(store, SecretManagerSecretStore)
    name = store.secret_name(cid)
    data = b"not a credential"
    added = store.client.add_secret_version(
        request={
            "parent": name,
            "payload": {"data": data, "data_crc32c": google_crc32c.value(data)},
        }
    )
    secret = store.client.get_secret(request={"name": name})
    annotations = {**dict(secret.annotations), CURRENT: added.name.rsplit("/", 1)[1]}
    store.client.update_secret(
        request={
            "secret": {"name": name, "etag": secret.etag, "annotations": annotations},
            "update_mask": {"paths": ["annotations"]},
        }
    )
    store._known.pop(cid, None)  # the handle must not answer from its memo


def _corrupt_secret_manager_pointed(ws: Workspace, store: SecretStore, cid: str) -> None:
    """A new version whose payload (with a correct checksum) is not a credential, pointed at
    in the state store, as a buggy or hostile writer would."""
    import google_crc32c

    from tokenbroker.adapters.gcp.secret_manager_pointed import PointedSecretManagerStore

    assert isinstance(store, PointedSecretManagerStore)
    data = b"not a credential"
    added = store.client.add_secret_version(
        request={
            "parent": store.secret_name(cid),
            "payload": {"data": data, "data_crc32c": google_crc32c.value(data)},
        }
    )
    version = int(added.name.rsplit("/", 1)[1])
    store.pointers.move_pointer(cid, accepted=None, version=version)


def _corrupt_aws(ws: Workspace, store: SecretStore, cid: str) -> None:
    """Overwrite nothing (versions are immutable): point AWSCURRENT at a new version whose
    envelope's digest does not match."""
    import json

    from tests.support.moto_server import moto_client
    from tokenbroker.adapters.aws import (
        CURRENT,
        LATEST,
        AwsSecretsManagerStore,
        encode_envelope,
        version_token,
    )

    from .builders import credential

    assert isinstance(store, AwsSecretsManagerStore)
    aws = moto_client()
    name = store.secret_name(cid)
    head = aws.get_secret_value(SecretId=name, VersionStage=LATEST)
    number = int(head["VersionId"].split("-")[1]) + 1
    envelope = json.loads(encode_envelope(number, credential("forged")))
    envelope["sha256"] = "0" * 64
    forged = version_token(cid, number)
    aws.put_secret_value(
        SecretId=name,
        ClientRequestToken=forged,
        SecretString=json.dumps(envelope),
        VersionStages=[LATEST],
    )
    aws.update_secret_version_stage(
        SecretId=name, VersionStage=CURRENT, MoveToVersionId=forged,
        RemoveFromVersionId=head["VersionId"],
    )  # fmt: skip


SECRET_STORES: dict[str, SecretStoreAdapter] = {
    "secret-manager": SecretStoreAdapter(open=_secret_manager, corrupt=_corrupt_secret_manager),
    "secret-manager-pointed": SecretStoreAdapter(
        open=_secret_manager_pointed, corrupt=_corrupt_secret_manager_pointed
    ),
    "memory": SecretStoreAdapter(open=_memory_secrets),
    "embedded": SecretStoreAdapter(open=_embedded_secrets, corrupt=_corrupt_embedded),
    "aws": SecretStoreAdapter(open=_aws_secrets, corrupt=_corrupt_aws),
}


# --- StateStore ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StateStoreAdapter:
    open: Callable[[Workspace], StateStore]


def _open_firestore_state(ws: Workspace) -> StateStore:
    """Firestore (emulator): a new client per call, on a project of the workspace's own, so
    tests never see each other's documents and every handle shares the same storage."""
    import uuid

    from tests.support.emulators import emulator
    from tokenbroker.adapters.gcp.firestore import FirestoreStateStore

    host = emulator("firestore").host
    project = ws.once("firestore-project", lambda: f"tb-test-{uuid.uuid4().hex[:12]}")
    store = FirestoreStateStore(project=project, emulator_host=host, lease_clock=ws.lease_clock)
    ws.on_close(store.close)
    return store


STATE_STORES: dict[str, StateStoreAdapter] = {
    "memory": StateStoreAdapter(
        open=lambda ws: ws.once("memory-state", lambda: MemoryStateStore(ws.lease_clock))
    ),
    "embedded": StateStoreAdapter(
        open=lambda ws: EmbeddedStateStore(_embedded_db(ws), lease_clock=ws.lease_clock)
    ),
    "firestore": StateStoreAdapter(open=_open_firestore_state),
}


# --- EventBus ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventBusAdapter:
    open: Callable[[Workspace], EventBus]
    #: Every event accepted so far, as a subscriber would observe it: each connection's events
    #: in publish order (and all of them in publish order if ``orders_across_connections``).
    read: Callable[[EventBus], Sequence[ConnectionEvent]]
    #: Whether publishing an event whose ``event_id`` was already accepted is a no-op.
    #: Delivery is at-least-once either way (subscribers de-duplicate on idempotency_key);
    #: adapters that cannot de-duplicate (memory keeps every copy) say False.
    dedupes_event_ids: bool
    #: Whether events of *different* connections are also observed in publish order. Pub/Sub
    #: orders only within an ordering key (= connection); across keys it promises no order
    #: (https://cloud.google.com/pubsub/docs/ordering).
    orders_across_connections: bool = True


def _read_memory(bus: EventBus) -> Sequence[ConnectionEvent]:
    assert isinstance(bus, MemoryEventBus)
    return list(bus.events)


def _read_outbox(bus: EventBus) -> Sequence[ConnectionEvent]:
    assert isinstance(bus, EmbeddedOutbox)
    return [event for _, event in bus.read(limit=1_000_000)]


# Pub/Sub (emulator): a fresh topic per workspace with an ordered subscription created before
# anything is published; ``read`` drains that subscription by synchronous pull, acks, and
# returns everything seen so far in delivery order (ordered per connection = ordering key).
_PUBSUB_PROJECT = "tokenbroker-test"
_PUBSUB_SEEN: dict[str, list[ConnectionEvent]] = {}


def _pubsub_topic(ws: Workspace) -> str:
    import uuid

    from google.cloud import pubsub_v1

    from tests.support.emulators import emulator

    emulator("pubsub")
    name = f"tb-contract-{uuid.uuid4().hex[:12]}"
    topic = f"projects/{_PUBSUB_PROJECT}/topics/{name}"
    subscription = f"projects/{_PUBSUB_PROJECT}/subscriptions/{name}"
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(name=topic)
    subscriber.create_subscription(
        request={"name": subscription, "topic": topic, "enable_message_ordering": True}
    )

    def delete() -> None:
        _PUBSUB_SEEN.pop(subscription, None)
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
        subscriber.close()

    ws.on_close(delete)
    return topic


def _open_pubsub(ws: Workspace) -> EventBus:
    from tokenbroker.adapters.gcp.pubsub import PubSubEventBus

    bus = PubSubEventBus(ws.once("pubsub-topic", lambda: _pubsub_topic(ws)))
    ws.on_close(bus.close)
    return bus


def _read_pubsub(bus: EventBus) -> Sequence[ConnectionEvent]:
    from google.api_core.exceptions import DeadlineExceeded
    from google.cloud import pubsub_v1

    from tokenbroker.adapters.gcp.pubsub import PubSubEventBus
    from tokenbroker.consumer.subscriber import parse_message

    assert isinstance(bus, PubSubEventBus)
    subscription = bus.topic.replace("/topics/", "/subscriptions/")
    seen = _PUBSUB_SEEN.setdefault(subscription, [])
    with pubsub_v1.SubscriberClient() as subscriber:
        # Until a pull comes back empty: the emulator answers empty ~1 s before the deadline.
        while True:
            try:
                response = subscriber.pull(
                    request={"subscription": subscription, "max_messages": 1000},
                    timeout=2.0,
                    retry=None,
                )
            except DeadlineExceeded:
                break
            received = list(response.received_messages)
            if not received:
                break
            subscriber.acknowledge(
                request={"subscription": subscription, "ack_ids": [m.ack_id for m in received]}
            )
            seen.extend(parse_message(m.message) for m in received)
    return list(seen)


EVENT_BUSES: dict[str, EventBusAdapter] = {
    "memory": EventBusAdapter(
        open=lambda ws: ws.once("memory-events", MemoryEventBus),
        read=_read_memory,
        dedupes_event_ids=False,
    ),
    "embedded": EventBusAdapter(
        open=lambda ws: EmbeddedOutbox(_embedded_db(ws)),
        read=_read_outbox,
        dedupes_event_ids=True,
    ),
    "pubsub": EventBusAdapter(
        open=_open_pubsub,
        read=_read_pubsub,
        dedupes_event_ids=False,
        orders_across_connections=False,
    ),
}


# --- TokenEndpoint -------------------------------------------------------------------------

#: Each rig is a TokenEndpoint under test plus a scripted server it talks to.
# --- AuthorizationSessions -------------------------------------------------------------------


def _firestore_sessions(ws: Workspace) -> AuthorizationSessions:
    """Firestore (emulator): a new client per call on the workspace's own project, all handles
    sealing with the workspace's one session key (as instances of one deployment do)."""
    import base64
    import secrets

    from tests.support.emulators import emulator
    from tokenbroker.adapters.gcp.firestore_sessions import FirestoreAuthorizationSessions
    from tokenbroker.kernel.secret import Secret

    host = emulator("firestore").host
    project = ws.once("firestore-project", lambda: f"tb-test-{uuid.uuid4().hex[:12]}")
    key = ws.once("session-key", lambda: base64.b64encode(secrets.token_bytes(32)).decode())
    sessions = FirestoreAuthorizationSessions(
        session_key=Secret(key), project=project, emulator_host=host
    )
    ws.on_close(sessions.close)
    return sessions


#: ``open(ws)``: a new handle on the workspace's sessions (memory: the same object; embedded:
#: a new SQLite connection on the same file, as another process would have; firestore: a new
#: client on the emulator).
AUTHORIZATION_SESSIONS: dict[str, Callable[[Workspace], AuthorizationSessions]] = {
    "memory": lambda ws: ws.once("memory-sessions", MemoryAuthorizationSessions),
    "embedded": lambda ws: EmbeddedAuthorizationSessions(_embedded_db(ws)),
    "firestore": _firestore_sessions,
}


TOKEN_ENDPOINTS: dict[str, Callable[[], EndpointRig]] = {
    "fake": FakeTokenServerRig,
    "aiohttp": AiohttpServerRig,
}
