"""Consuming connection events from Pub/Sub: parse, de-duplicate, then ack or nack.

Pub/Sub delivers every message at least once (https://cloud.google.com/pubsub/docs/subscriber),
and the broker may publish one happening twice (a retried publish), so a consumer sees
duplicates. Each happening has one ``idempotency_key`` (message attribute and body field):
:class:`EventSubscriber` remembers the most recent ``dedupe_window`` keys it handled and acks a
repeat without calling the callback again. That memory is per process; a consumer that must
never act twice across instances records the key in its own store (docs/pubsub.md).

Acknowledgement follows the callback: ack after it returns, nack when it raises, so Pub/Sub
redelivers (after the subscription's retry policy backoff, and to the dead-letter topic after
``max_delivery_attempts``; https://cloud.google.com/pubsub/docs/handling-failures). A message
that is not a tokenbroker event is nacked too, so a dead-letter policy catches it rather than
it being dropped silently.

The google client is imported only inside :func:`subscribe`; parsing and the callback wrapper
work on anything with ``data`` and ``attributes`` (a streaming-pull ``Message``, a
``PubsubMessage`` from a synchronous pull) or on a push/CloudEvent ``message`` mapping.
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from tokenbroker.kernel.errors import TokenBrokerError
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import ConnectionEvent

__all__ = ["EventSubscriber", "MalformedEvent", "parse_message", "subscribe"]


class MalformedEvent(TokenBrokerError):
    """A message that is not a valid tokenbroker connection event."""

    code = "malformed_event"
    http_status = 400


def _parts(message: Any) -> tuple[bytes, Mapping[str, str]]:
    if isinstance(message, Mapping):  # push body / CloudEvent: {"data": base64, "attributes"}
        try:
            data = base64.b64decode(message.get("data") or "", validate=True)
        except (binascii.Error, ValueError):
            raise MalformedEvent("message data is not base64") from None
        return data, message.get("attributes") or {}
    return bytes(message.data), message.attributes


def parse_message(message: Any) -> ConnectionEvent:
    """The :class:`ConnectionEvent` a Pub/Sub message carries. Raises MalformedEvent.

    The body is authoritative; the ``idempotency_key`` attribute, when present, must agree
    with it (a disagreement means the message was not written by the broker).
    """
    data, attributes = _parts(message)
    try:
        event = ConnectionEvent.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedEvent(
            f"message body is not a connection event ({type(exc).__name__})"
        ) from None
    attribute_key = attributes.get("idempotency_key")
    if attribute_key is not None and attribute_key != event.idempotency_key:
        raise MalformedEvent("idempotency_key attribute does not match the body")
    return event


class EventSubscriber:
    """A streaming-pull callback: ``callback(event)`` once per idempotency key, then ack.

    Thread-safe: the client library runs callbacks on a thread pool. With message ordering
    enabled on the subscription, messages of one connection reach the callback one at a time,
    in order (https://cloud.google.com/pubsub/docs/ordering). Without it, a duplicate may
    arrive while the first copy is still being handled; it is nacked (not acked) so it comes
    back and is acked as a duplicate only once the first copy succeeded.
    """

    def __init__(
        self, callback: Callable[[ConnectionEvent], object], *, dedupe_window: int = 10_000
    ) -> None:
        if dedupe_window < 1:
            raise ValueError("dedupe_window must be at least 1")
        self.callback = callback
        self.dedupe_window = dedupe_window
        self._done: OrderedDict[str, None] = OrderedDict()
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self.log = get_logger(component="event-subscriber")

    def seen(self, idempotency_key: str) -> bool:
        """Whether an event with this key was handled (within the window)."""
        with self._lock:
            return idempotency_key in self._done

    def __call__(self, message: Any) -> None:
        try:
            event = parse_message(message)
        except MalformedEvent as exc:
            # The reason is the whole story; a traceback would add nothing.
            self.log.error("not a connection event; nacked", error=exc.message)
            message.nack()
            return
        key = event.idempotency_key
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                verdict = "duplicate"
            elif key in self._in_flight:
                verdict = "busy"
            else:
                self._in_flight.add(key)
                verdict = "new"
        if verdict == "duplicate":
            message.ack()
            return
        if verdict == "busy":
            message.nack()
            return
        try:
            self.callback(event)
        except Exception as exc:  # noqa: BLE001 - any failure means "redeliver", reported by nack
            with self._lock:
                self._in_flight.discard(key)
            self.log.warning(
                "event callback failed; nacked for redelivery",
                event_type=event.type.value,
                connection_id=event.connection_id,
                idempotency_key=key,
                delivery_attempt=getattr(message, "delivery_attempt", None),
                error=type(exc).__name__,
            )
            message.nack()
            return
        with self._lock:
            self._in_flight.discard(key)
            self._done[key] = None
            while len(self._done) > self.dedupe_window:
                self._done.popitem(last=False)
        message.ack()


def subscribe(
    subscription: str,
    callback: Callable[[ConnectionEvent], object],
    *,
    dedupe_window: int = 10_000,
    subscriber: Any = None,
    max_messages: int = 100,
) -> Any:
    """Start a streaming pull on ``subscription`` (``projects/P/subscriptions/S``).

    Returns the client's ``StreamingPullFuture``: ``.result()`` blocks while messages flow,
    ``.cancel()`` stops. ``subscriber`` is a ``pubsub_v1.SubscriberClient`` (one is built when
    omitted); ``max_messages`` caps messages outstanding in this process (flow control).
    """
    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # noqa: PLC0415 - untyped, heavy

    client = subscriber if subscriber is not None else pubsub_v1.SubscriberClient()
    return client.subscribe(
        subscription,
        EventSubscriber(callback, dedupe_window=dedupe_window),
        flow_control=pubsub_v1.types.FlowControl(max_messages=max_messages),
    )
