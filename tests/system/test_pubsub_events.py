"""Connection events through the official Pub/Sub emulator, seen by real subscribers.

Every streaming test gets a fresh topic and subscription: after a streaming subscriber is
cancelled, a new one on the same subscription may see nothing for 15-45 s (PLATFORM.md).
Subscription ``filter`` is stored but not applied by the emulator, so it is not tested here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.support.emulators import emulator
from tokenbroker.adapters.gcp.pubsub import PubSubEventBus, event_attributes, event_data
from tokenbroker.consumer.subscriber import parse_message, subscribe
from tokenbroker.kernel.errors import StoreUnavailable
from tokenbroker.kernel.model import ConnectionEvent, EventType

PROJECT = "tokenbroker-test"
ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "event.schema.json").read_text())


def event(cid: str, n: int, event_type: EventType = EventType.ROTATED) -> ConnectionEvent:
    return ConnectionEvent(
        type=event_type,
        connection_id=cid,
        occurred_at=datetime(2026, 2, 1, 8, n // 60, n % 60, tzinfo=UTC),
        idempotency_key=ConnectionEvent.key_for(event_type, cid, str(n)),
        version=n,
        expires_at=datetime(2026, 2, 1, 9, 0, 0, tzinfo=UTC),
        error_code="invalid_grant" if event_type is EventType.NEEDS_REAUTH else None,
        failure_class="permanent" if event_type is EventType.NEEDS_REAUTH else None,
    )


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


@dataclass
class PubSub:
    """Admin clients on the emulator, and the topics/subscriptions a test made."""

    publisher: Any
    subscriber: Any
    made: list[tuple[str, str]]

    def topic(self, name: str | None = None, *, create: bool = True) -> str:
        path = f"projects/{PROJECT}/topics/{name or 'tb-' + uuid.uuid4().hex[:12]}"
        if create:
            self.publisher.create_topic(name=path)
            self.made.append(("topic", path))
        return path

    def subscription(self, topic: str, **settings: Any) -> str:
        path = topic.replace("/topics/", "/subscriptions/") + "-" + uuid.uuid4().hex[:6]
        self.subscriber.create_subscription(
            request={"name": path, "topic": topic, "enable_message_ordering": True, **settings}
        )
        self.made.append(("subscription", path))
        return path

    def pull_all(self, subscription: str) -> list[Any]:
        """Synchronous pull until empty; acks; returns the PubsubMessages."""
        from google.api_core.exceptions import DeadlineExceeded

        messages: list[Any] = []
        while True:
            try:
                response = self.subscriber.pull(
                    request={"subscription": subscription, "max_messages": 1000},
                    timeout=2.0,
                    retry=None,
                )
            except DeadlineExceeded:
                return messages
            if not response.received_messages:
                return messages
            self.subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
            messages.extend(m.message for m in response.received_messages)


@pytest.fixture
def pubsub() -> Iterator[PubSub]:
    emulator("pubsub")
    from google.cloud import pubsub_v1

    env = PubSub(pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient(), [])
    yield env
    for kind, path in reversed(env.made):
        if kind == "subscription":
            env.subscriber.delete_subscription(subscription=path)
        else:
            env.publisher.delete_topic(topic=path)
    env.subscriber.close()


@pytest.fixture
def bus_factory() -> Iterator[Callable[..., PubSubEventBus]]:
    buses: list[PubSubEventBus] = []

    def make(topic: str, **options: Any) -> PubSubEventBus:
        bus = PubSubEventBus(topic, **options)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        bus.close()


class Streaming:
    """A streaming-pull subscription running until the test ends."""

    def __init__(self, future: Any) -> None:
        self.future = future

    def stop(self) -> None:
        self.future.cancel()
        self.future.result(timeout=30)


@pytest.fixture
def streaming() -> Iterator[Callable[[Any], Streaming]]:
    running: list[Streaming] = []

    def start(future: Any) -> Streaming:
        running.append(Streaming(future))
        return running[-1]

    yield start
    for stream in running:
        stream.stop()


# --- publishing ------------------------------------------------------------------------------


@pytest.mark.system
def test_a_streaming_subscriber_receives_exactly_the_events_in_order_per_connection(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus], streaming: Any
) -> None:
    topic = pubsub.topic()
    subscription = pubsub.subscription(topic)
    received: list[Any] = []
    lock = threading.Lock()

    def record(message: Any) -> None:
        with lock:
            received.append(message)
        message.ack()

    streaming(pubsub.subscriber.subscribe(subscription, record))
    bus = bus_factory(topic)
    connections = ["acme-crm", "zoho-eu", "gmail-ops"]
    first = [event(cid, n) for n in range(1, 5) for cid in connections]
    second = [event(cid, n) for n in range(5, 9) for cid in connections]
    second[-1] = event("gmail-ops", 99, EventType.NEEDS_REAUTH)
    bus.publish(first)
    bus.publish(second)
    published = first + second

    wait_for(lambda: len(received) >= len(published))
    time.sleep(1.0)  # nothing more may arrive
    assert len(received) == len(published)

    validator = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
    by_id = {e.event_id: e for e in published}
    for message in received:
        sent = by_id[message.attributes["event_id"]]
        assert message.data == event_data(sent)
        assert dict(message.attributes) == event_attributes(sent)
        assert message.ordering_key == sent.connection_id
        body = json.loads(message.data)
        validator.validate(body)
        assert parse_message(message) == sent
    for cid in connections:
        expected = [e.event_id for e in published if e.connection_id == cid]
        observed = [m.attributes["event_id"] for m in received if m.ordering_key == cid]
        assert observed == expected, cid
    reauth = next(m for m in received if m.attributes["type"] == "connection.needs_reauth")
    assert dict(reauth.attributes) == {
        "type": "connection.needs_reauth",
        "connection": "gmail-ops",
        "version": "99",
        "idempotency_key": second[-1].idempotency_key,
        "schema_version": "1",
        "event_id": second[-1].event_id,
    }


@pytest.mark.system
def test_an_event_without_a_version_has_an_empty_version_attribute(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus]
) -> None:
    topic = pubsub.topic()
    subscription = pubsub.subscription(topic)
    bare = ConnectionEvent(
        type=EventType.REFRESH_FAILED,
        connection_id="c1",
        occurred_at=datetime(2026, 2, 1, 8, 0, 0, tzinfo=UTC),
        idempotency_key=ConnectionEvent.key_for(EventType.REFRESH_FAILED, "c1", "7"),
        error_code="server_error",
        failure_class="transient",
        consecutive_failures=2,
    )
    bus_factory(topic).publish([bare])
    (message,) = pubsub.pull_all(subscription)
    assert message.attributes["version"] == ""
    Draft202012Validator(SCHEMA).validate(json.loads(message.data))
    assert parse_message(message) == bare


@pytest.mark.system
def test_publishing_to_a_missing_topic_is_store_unavailable_and_the_key_resumes(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus]
) -> None:
    topic = pubsub.topic(create=False)
    bus = bus_factory(topic, timeout=10.0)
    events = [event("c1", 1), event("c1", 2)]

    with pytest.raises(StoreUnavailable) as failure:
        bus.publish(events)
    assert failure.value.retryable
    assert "2 of 2 events" in failure.value.message
    assert "NotFound" in failure.value.message

    # Resumed: a second attempt is sent again (NotFound), not refused as a paused key.
    with pytest.raises(StoreUnavailable) as again:
        bus.publish(events[:1])
    assert "NotFound" in again.value.message
    assert "Paused" not in again.value.message

    pubsub.publisher.create_topic(name=topic)
    pubsub.made.append(("topic", topic))
    subscription = pubsub.subscription(topic)
    later = event("c1", 3)
    bus.publish([later])  # same ordering key, same client
    assert [parse_message(m) for m in pubsub.pull_all(subscription)] == [later]


@pytest.mark.system
def test_no_confirmation_within_the_timeout_is_store_unavailable(
    monkeypatch: pytest.MonkeyPatch, bus_factory: Callable[..., PubSubEventBus]
) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    bus = bus_factory(f"projects/{PROJECT}/topics/tb-unreachable", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as failure:
        bus.publish([event("c1", 1), event("c2", 1)])
    assert time.monotonic() - started < 5.0
    assert "2 of 2 events" in failure.value.message
    assert "no confirmation within 1s" in failure.value.message


# --- the subscriber helper ---------------------------------------------------------------------


@pytest.mark.system
def test_the_subscriber_helper_acts_once_per_idempotency_key(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus], streaming: Any
) -> None:
    topic = pubsub.topic()
    subscription = pubsub.subscription(topic)
    handled: list[ConnectionEvent] = []
    streaming(subscribe(subscription, handled.append, subscriber=pubsub.subscriber))
    bus = bus_factory(topic)
    rotated = event("c1", 1)
    redelivery = replace(rotated, event_id=str(uuid.uuid4()))  # same happening, new event id
    after = event("c1", 2)
    bus.publish([rotated])
    bus.publish([rotated])  # a retried publish: the very same event again
    bus.publish([redelivery, after])

    wait_for(lambda: len(handled) >= 2)
    time.sleep(1.5)  # the duplicates have been delivered (ordered after the first) and acked
    assert handled == [rotated, after]
    assert pubsub.pull_all(subscription) == []  # duplicates were acked, not left outstanding


@pytest.mark.system
def test_a_failing_callback_nacks_and_the_event_comes_back(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus], streaming: Any
) -> None:
    topic = pubsub.topic()
    subscription = pubsub.subscription(topic)
    calls: list[str] = []
    done: list[ConnectionEvent] = []

    def flaky(received: ConnectionEvent) -> None:
        calls.append(received.event_id)
        if calls.count(received.event_id) == 1:
            raise RuntimeError("downstream is down")
        done.append(received)

    streaming(subscribe(subscription, flaky, subscriber=pubsub.subscriber))
    sent = event("c1", 1)
    bus_factory(topic).publish([sent])
    wait_for(lambda: len(done) == 1)
    assert done == [sent]
    assert calls == [sent.event_id, sent.event_id]


@pytest.mark.system
def test_a_message_that_is_not_an_event_goes_to_the_dead_letter_topic(
    pubsub: PubSub, streaming: Any
) -> None:
    topic = pubsub.topic()
    dead_letters = pubsub.topic()
    dead_letter_subscription = pubsub.subscription(dead_letters)
    # Without ordering: the emulator stops redelivering an ordered message after
    # max_delivery_attempts but never forwards it to the dead-letter topic (GCP does, best
    # effort: https://cloud.google.com/pubsub/docs/ordering). What is tested here is that the
    # helper nacks what it cannot parse, so the policy gets to act.
    subscription = pubsub.subscription(
        topic,
        enable_message_ordering=False,
        dead_letter_policy={"dead_letter_topic": dead_letters, "max_delivery_attempts": 5},
    )
    handled: list[ConnectionEvent] = []
    streaming(subscribe(subscription, handled.append, subscriber=pubsub.subscriber))
    pubsub.publisher.publish(topic, b"not an event").result(timeout=10)

    found: list[Any] = []

    def dead_lettered() -> bool:
        found.extend(pubsub.pull_all(dead_letter_subscription))
        return bool(found)

    wait_for(dead_lettered, timeout=60.0)
    assert [m.data for m in found] == [b"not an event"]
    assert handled == []


# --- the example worker ------------------------------------------------------------------------


@pytest.mark.system
def test_the_example_worker_rereads_on_rotation_and_alerts_on_needs_reauth(
    pubsub: PubSub, bus_factory: Callable[..., PubSubEventBus], tmp_path: Path
) -> None:
    from tests.conftest import save_output
    from tests.system.helpers import embedded_runtime
    from tokenbroker.kernel.model import Credential
    from tokenbroker.kernel.secret import Secret

    runtime = embedded_runtime(tmp_path)
    for version in (1, 2):
        runtime.secrets.put(
            "c1",
            Credential(access_token=Secret(f"example-at-{version}")),
            expected_version=None if version == 1 else 1,
        )
    runtime.close()
    topic = pubsub.topic()
    subscription = pubsub.subscription(topic)
    env = {
        **os.environ,
        "TOKENBROKER_EVENTS_SUBSCRIPTION": subscription,
        "TOKENBROKER_BACKEND": "embedded",
        "TOKENBROKER_STATE_DIR": str(tmp_path),
    }
    stderr_path = tmp_path / "example.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / "subscriber.py")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()
    try:
        wait_for(lambda: any(line.startswith("listening on") for line in lines))
        bus_factory(topic).publish(
            [event("c1", 2), event("c2", 5, EventType.NEEDS_REAUTH), event("c1", 2)]
        )
        wait_for(lambda: len(lines) >= 3)
        time.sleep(0.5)  # the duplicate rotation is delivered too, and must print nothing
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(10)
        save_output("example-subscriber", "".join(lines), stderr_path.read_bytes())
    assert sorted(lines[1:]) == [
        "ALERT c2 needs re-authorisation (invalid_grant)\n",
        "c1: now using credential v2\n",
    ]


# --- publish bookkeeping, on a fake client with the real client's pause rules -----------------


FAKE_TOPIC = f"projects/{PROJECT}/topics/tb-fake"


class PausingPublisher:
    """Like ``PublisherClient`` with ordering on: a failed key is paused and refuses messages
    until ``resume_publish``; resuming a key that is not paused raises RuntimeError."""

    class Options:
        enable_message_ordering = True

    publisher_options = Options()

    def __init__(self, failing: set[str]) -> None:
        self.failing = failing
        self.paused: set[str] = set()
        self.resumed: list[tuple[str, str]] = []
        self.published: list[tuple[str, bytes]] = []
        self.attributes: list[dict[str, str]] = []

    def publish(self, topic: str, data: bytes, *, ordering_key: str, **attrs: str) -> Any:
        from concurrent.futures import Future

        assert topic == FAKE_TOPIC
        future: Future[str] = Future()
        if ordering_key in self.paused:
            future.set_exception(RuntimeError("PublishToPausedOrderingKeyException"))
        elif ordering_key in self.failing:
            self.paused.add(ordering_key)
            future.set_exception(LookupError("NotFound"))
        else:
            self.published.append((ordering_key, data))
            self.attributes.append(attrs)
            future.set_result(str(len(self.published)))
        return future

    def resume_publish(self, topic: str, ordering_key: str) -> None:
        if ordering_key not in self.paused:
            raise RuntimeError("Ordering key is not paused.")
        self.paused.discard(ordering_key)
        self.resumed.append((topic, ordering_key))


def test_only_the_failed_connections_are_counted_and_resumed() -> None:
    fake = PausingPublisher(failing={"bad"})
    bus = PubSubEventBus(FAKE_TOPIC, publisher=fake)
    events = [event("good", 1), event("bad", 1), event("good", 2), event("bad", 2)]
    with pytest.raises(StoreUnavailable) as failure:
        bus.publish(events)
    assert "2 of 4 events" in failure.value.message
    assert fake.resumed == [(FAKE_TOPIC, "bad")]
    assert [k for k, _ in fake.published] == ["good", "good"]
    assert [json.loads(d)["version"] for _, d in fake.published] == [1, 2]  # in order
    assert fake.attributes == [event_attributes(events[0]), event_attributes(events[2])]
    fake.failing.clear()
    bus.publish([event("bad", 3)])  # resumed: accepted again
    assert fake.published[-1][0] == "bad"


def test_at_most_max_keys_in_flight_connections_are_unconfirmed_at_once() -> None:
    class SlowPublisher(PausingPublisher):
        """Confirms each message 20 ms later, on another thread, like the real client."""

        def __init__(self) -> None:
            super().__init__(failing=set())
            self.lock = threading.Lock()
            self.unconfirmed: dict[str, int] = {}
            self.most_keys_unconfirmed = 0

        def publish(self, topic: str, data: bytes, *, ordering_key: str, **attrs: str) -> Any:
            from concurrent.futures import Future

            assert topic == FAKE_TOPIC and attrs["connection"] == ordering_key
            future: Future[str] = Future()
            with self.lock:
                self.unconfirmed[ordering_key] = self.unconfirmed.get(ordering_key, 0) + 1
                self.most_keys_unconfirmed = max(self.most_keys_unconfirmed, len(self.unconfirmed))

            def confirm() -> None:
                with self.lock:
                    self.unconfirmed[ordering_key] -= 1
                    if not self.unconfirmed[ordering_key]:
                        del self.unconfirmed[ordering_key]
                    self.published.append((ordering_key, data))
                future.set_result("id")

            threading.Timer(0.02, confirm).start()
            return future

    fake = SlowPublisher()
    bus = PubSubEventBus(FAKE_TOPIC, publisher=fake, max_keys_in_flight=2)
    bus.publish([event(f"c{i % 5}", i) for i in range(1, 11)])
    assert fake.most_keys_unconfirmed == 2
    assert len(fake.published) == 10


def test_a_publisher_without_ordering_is_refused() -> None:
    from tokenbroker.kernel.errors import ConfigError

    class Unordered(PausingPublisher):
        class Options:
            enable_message_ordering = False

        publisher_options = Options()

    with pytest.raises(ConfigError):
        PubSubEventBus(FAKE_TOPIC, publisher=Unordered(set()))
    with pytest.raises(ConfigError):
        PubSubEventBus("tokenbroker-events")


def test_parse_message_reads_push_envelopes_and_refuses_what_is_not_an_event() -> None:
    import base64

    from tokenbroker.consumer.subscriber import MalformedEvent

    sent = event("c1", 3)
    push = {
        "data": base64.b64encode(event_data(sent)).decode(),
        "attributes": event_attributes(sent),
    }
    assert parse_message(push) == sent
    forged = {**push, "attributes": {**event_attributes(sent), "idempotency_key": "0" * 32}}
    for bad in (forged, {"data": "!!"}, {"data": base64.b64encode(b"[1]").decode()}):
        with pytest.raises(MalformedEvent):
            parse_message(bad)


# --- cold start ------------------------------------------------------------------------------


def test_importing_the_adapter_and_helper_does_not_import_the_google_clients() -> None:
    code = (
        "import sys, tokenbroker.adapters.gcp.pubsub, tokenbroker.consumer.subscriber\n"
        "heavy = [m for m in sys.modules if m.startswith(('google.cloud.pubsub', "
        "'google.api_core', 'google.auth', 'grpc'))]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
