"""Connection events on Google Cloud Pub/Sub: one message per event, ordered per connection.

Message layout (the consumer-facing contract, documented in docs/pubsub.md):

* ``data``: the event as compact UTF-8 JSON, exactly ``ConnectionEvent.to_json()``
  (schema: docs/event.schema.json). Never token material: events carry none.
* ``attributes``: ``type``, ``connection``, ``version`` (``""`` when none),
  ``idempotency_key``, ``schema_version`` and ``event_id`` -- enough to filter
  (https://cloud.google.com/pubsub/docs/subscription-message-filter) and de-duplicate without
  parsing the body.
* ``ordering_key``: the connection id. Pub/Sub delivers messages with the same ordering key in
  publish order to subscriptions with message ordering enabled, and promises nothing across
  keys (https://cloud.google.com/pubsub/docs/ordering).

Why the publish path looks the way it does:

* **Confirmed before returning.** ``publish`` waits for every message's future: the
  ``EventBus`` port promises the events were durably accepted when it returns. Any message not
  confirmed within ``timeout`` turns the whole call into a retryable
  :class:`~tokenbroker.kernel.errors.StoreUnavailable` that names how many failed; google exceptions
  never leave this module.
* **Ordering-key pause.** With ordering enabled, a message that fails permanently pauses its
  ordering key in the client: queued and later messages for that key fail until
  ``resume_publish(topic, key)`` is called
  (https://cloud.google.com/pubsub/docs/samples/pubsub-resume-publish-with-ordering-keys).
  We resume every key that failed before raising, so the caller's retry -- the next tick on a
  warm instance -- is not stuck. Transient errors never pause a key: with ordering enabled the
  client retries them without a deadline, which is why ``timeout`` bounds our wait instead.
* **At-least-once.** A message can be accepted while our wait times out, and a caller retry
  then publishes it again; subscribers de-duplicate on ``idempotency_key``. Order per
  connection still holds, because a retry queues behind the earlier attempt's messages for the
  same key.
* **Batching and cost.** The PublishRequest carries one ordering key
  (https://cloud.google.com/pubsub/docs/reference/rpc/google.pubsub.v1#pubsubmessage), so the
  client sends one Publish RPC per connection per call (up to ``batch_max_messages`` events
  each), and each request is billed at least 1000 bytes
  (https://cloud.google.com/pubsub/pricing). The client commits a batch on its own thread;
  ``max_keys_in_flight`` caps how many connections are published at once so a 500-event
  commit does not start 500 threads.
* **One client per instance.** The client is built on first publish (importing it costs cold
  start time) and reused: a function instance publishes many ticks.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent import futures as cf
from typing import Any

from tokenbroker.kernel.errors import ConfigError, StoreUnavailable
from tokenbroker.kernel.model import ConnectionEvent

__all__ = ["PubSubEventBus", "event_attributes", "event_data"]


def event_data(event: ConnectionEvent) -> bytes:
    """The message body: the event's JSON, compact, UTF-8."""
    return json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode()


def event_attributes(event: ConnectionEvent) -> dict[str, str]:
    """The message attributes (all strings, as Pub/Sub requires)."""
    return {
        "type": event.type.value,
        "connection": event.connection_id,
        "version": "" if event.version is None else str(event.version),
        "idempotency_key": event.idempotency_key,
        "schema_version": str(event.schema_version),
        "event_id": event.event_id,
    }


def _reason(exc: BaseException) -> str:
    """A payload-free name for a publish failure: ``NotFound``, ``PermissionDenied``,
    ``PublishToPausedOrderingKeyException``, ..."""
    return type(exc).__name__


class PubSubEventBus:
    """:class:`~tokenbroker.ports.EventBus` on a Pub/Sub topic (``projects/P/topics/T``).

    ``publisher`` is an existing ``pubsub_v1.PublisherClient`` (it must have message ordering
    enabled); by default one is built lazily with ``batch_max_messages`` / ``batch_max_latency``
    as its batch settings
    (https://cloud.google.com/python/docs/reference/pubsub/latest/google.cloud.pubsub_v1.types.BatchSettings).
    ``timeout`` is the most one ``publish`` call waits for confirmations, in seconds.
    """

    def __init__(
        self,
        topic: str,
        *,
        publisher: Any = None,
        batch_max_messages: int = 100,
        batch_max_latency: float = 0.01,
        timeout: float = 30.0,
        max_keys_in_flight: int = 100,
    ) -> None:
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "topics" or "" in parts:
            raise ConfigError(f"Pub/Sub topic {topic!r} must be projects/PROJECT/topics/TOPIC")
        if batch_max_messages < 1 or batch_max_latency < 0 or timeout <= 0:
            raise ConfigError("Pub/Sub batch settings and timeout must be positive")
        if max_keys_in_flight < 1:
            raise ConfigError("Pub/Sub max_keys_in_flight must be at least 1")
        self.topic = topic
        self.timeout = timeout
        self.max_keys_in_flight = max_keys_in_flight
        self._batch_max_messages = batch_max_messages
        self._batch_max_latency = batch_max_latency
        self._publisher = publisher
        self._owns_publisher = publisher is None
        self._lock = threading.Lock()
        if publisher is not None:
            self._check_ordering(publisher)

    @staticmethod
    def _check_ordering(publisher: Any) -> None:
        options = getattr(publisher, "publisher_options", None)
        if options is not None and not options.enable_message_ordering:
            raise ConfigError(
                "the Pub/Sub publisher must be built with "
                "PublisherOptions(enable_message_ordering=True): events are ordered per connection"
            )

    @property
    def publisher(self) -> Any:
        """The PublisherClient, built on first use (thread-safe) and kept."""
        if self._publisher is None:
            with self._lock:
                if self._publisher is None:
                    self._publisher = self._make_publisher()
        return self._publisher

    def _make_publisher(self) -> Any:
        from google.auth import exceptions as auth_exceptions  # noqa: PLC0415 - heavy, lazily
        from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # noqa: PLC0415 - untyped

        try:
            return pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(
                    max_messages=self._batch_max_messages, max_latency=self._batch_max_latency
                ),
                publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
            )
        except auth_exceptions.DefaultCredentialsError:
            raise ConfigError(
                "Pub/Sub: no Application Default Credentials (or set PUBSUB_EMULATOR_HOST)"
            ) from None

    def publish(self, events: Sequence[ConnectionEvent]) -> None:
        """Publish ``events`` and return once Pub/Sub has confirmed every one of them.

        Raises StoreUnavailable (retryable) when any event was not confirmed; some of the
        others may have been delivered, so a retry can produce duplicates (at-least-once).
        """
        if not events:
            return
        by_key: dict[str, list[ConnectionEvent]] = {}
        for event in events:
            by_key.setdefault(event.connection_id, []).append(event)
        keys = list(by_key)
        deadline = time.monotonic() + self.timeout
        failures: Counter[str] = Counter()
        for start in range(0, len(keys), self.max_keys_in_flight):
            chunk = keys[start : start + self.max_keys_in_flight]
            if time.monotonic() >= deadline:
                failures["not attempted before the deadline"] += sum(len(by_key[k]) for k in chunk)
                continue
            failures.update(self._publish_keys({k: by_key[k] for k in chunk}, deadline))
        if failures:
            failed = sum(failures.values())
            reasons = ", ".join(f"{reason} x{n}" for reason, n in sorted(failures.items()))
            raise StoreUnavailable(
                f"Pub/Sub publish to {self.topic}: {failed} of {len(events)} events "
                f"not confirmed ({reasons})"
            )

    def _publish_keys(
        self, by_key: dict[str, list[ConnectionEvent]], deadline: float
    ) -> Counter[str]:
        """Publish each key's events in order, wait for all, resume keys that failed."""
        publisher = self.publisher
        sent: list[tuple[str, Any]] = []
        for key, key_events in by_key.items():
            for event in key_events:
                future = publisher.publish(
                    self.topic, event_data(event), ordering_key=key, **event_attributes(event)
                )
                sent.append((key, future))
        cf.wait([f for _, f in sent], timeout=max(0.0, deadline - time.monotonic()))
        failures: Counter[str] = Counter()
        paused: set[str] = set()
        for key, future in sent:
            if not future.done():
                failures[f"no confirmation within {self.timeout:g}s"] += 1
                continue
            exc = future.exception()
            if exc is not None:
                failures[_reason(exc)] += 1
                paused.add(key)
        for key in paused:
            self._resume(key)
        return failures

    def _resume(self, key: str) -> None:
        """Unpause ``key`` so later publishes for the connection are accepted again.

        After an RPC error the client pauses the key *before* failing the batch's futures, so
        the key is paused by the time we see the failure. RuntimeError ("not paused") means a
        concurrent publish resumed it already. In the one path where the client fails futures
        first (a response with fewer ids than messages) the key may pause just after this call;
        the next publish for it then fails fast with PublishToPausedOrderingKeyException, and
        is resumed here in turn.
        """
        with contextlib.suppress(RuntimeError, ValueError):
            self.publisher.resume_publish(self.topic, key)

    def close(self) -> None:
        """Flush and stop the client this bus built (one passed in is the caller's to stop).
        Publishing again builds a new one."""
        if not self._owns_publisher:
            return
        with self._lock:
            publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.stop()

    def __repr__(self) -> str:
        return f"PubSubEventBus(topic={self.topic!r})"
