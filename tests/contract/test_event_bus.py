"""The EventBus contract (tokenbroker.ports.EventBus), for every adapter in the registry.

``publish`` returns once the events are durably accepted; what a subscriber then observes is
read back through the registry entry's ``read``. Delivery is at-least-once: an adapter may or
may not drop a re-published event (same ``event_id``); the registry says which
(``dedupes_event_ids``), and both behaviours are pinned down here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from tokenbroker.kernel.model import ConnectionEvent, EventType
from tokenbroker.ports import EventBus

from .builders import event
from .registry import EventBusAdapter

OpenEventBus = Callable[[], EventBus]


def by_connection(events: Sequence[ConnectionEvent]) -> dict[str, list[ConnectionEvent]]:
    grouped: dict[str, list[ConnectionEvent]] = {}
    for e in events:
        grouped.setdefault(e.connection_id, []).append(e)
    return grouped


def assert_observed_in_order(
    adapter: EventBusAdapter,
    observed: Sequence[ConnectionEvent],
    published: Sequence[ConnectionEvent],
) -> None:
    """Every bus keeps each connection's events in publish order; only some keep a total
    order across connections (``orders_across_connections``)."""
    if adapter.orders_across_connections:
        assert list(observed) == list(published)
    else:
        assert len(observed) == len(published)
        assert by_connection(observed) == by_connection(published)


def test_published_events_are_observable_in_order(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    assert list(event_bus_adapter.read(event_bus)) == []
    events = [event("c1", n=1), event("c2", EventType.REFRESH_FAILED, n=2), event("c1", n=3)]
    event_bus.publish(events)
    assert_observed_in_order(event_bus_adapter, event_bus_adapter.read(event_bus), events)


def test_order_is_kept_across_publishes(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    batches = [[event("b", n=n) for n in range(k * 10, k * 10 + 10)] for k in range(5)]
    for batch in batches:
        event_bus.publish(batch)
    event_bus.publish([])
    observed = list(event_bus_adapter.read(event_bus))
    assert observed == [e for batch in batches for e in batch]
    assert [e.event_id for e in observed] == [e.event_id for batch in batches for e in batch]


def test_publishing_nothing_is_accepted(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    event_bus.publish([])
    assert list(event_bus_adapter.read(event_bus)) == []


def test_republishing_the_same_event(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    first, second = event("c1", n=1), event("c1", n=2)
    event_bus.publish([first, second])
    event_bus.publish([first])  # a retry after a crash between publish and commit
    event_bus.publish([second, second])  # and twice in one batch
    observed = list(event_bus_adapter.read(event_bus))
    if event_bus_adapter.dedupes_event_ids:
        assert observed == [first, second]
    else:  # kept as at-least-once copies, in publish order
        assert observed == [first, second, first, second, second]


def test_distinct_events_with_the_same_idempotency_key_are_all_kept(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    """De-duplication on idempotency_key is the subscriber's job, not the bus's."""
    one = event("c1", n=1)
    redelivery = replace(one, event_id="other-delivery")
    assert redelivery.idempotency_key == one.idempotency_key
    event_bus.publish([one])
    event_bus.publish([redelivery])
    assert list(event_bus_adapter.read(event_bus)) == [one, redelivery]


def test_events_are_observable_through_another_handle(
    open_event_bus: OpenEventBus, event_bus_adapter: EventBusAdapter
) -> None:
    writer = open_event_bus()
    events = [event("c1", n=n) for n in range(3)]
    writer.publish(events)
    assert list(event_bus_adapter.read(open_event_bus())) == events


def test_every_field_survives_the_bus(
    event_bus: EventBus, event_bus_adapter: EventBusAdapter
) -> None:
    full = ConnectionEvent(
        type=EventType.NEEDS_REAUTH,
        connection_id="c-full",
        occurred_at=datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC),
        idempotency_key=ConnectionEvent.key_for(EventType.NEEDS_REAUTH, "c-full", "x"),
        version=7,
        expires_at=datetime(2026, 2, 3, 5, 5, 6, tzinfo=UTC),
        error_code="invalid_grant",
        failure_class="permanent",
        consecutive_failures=3,
        event_id="0b5f6c3e-0000-4000-8000-000000000001",
    )
    bare = ConnectionEvent(
        type=EventType.RECOVERED,
        connection_id="c-bare",
        occurred_at=datetime(2026, 2, 3, 4, 5, 7, tzinfo=UTC),
        idempotency_key="k",
    )
    event_bus.publish([full, bare])
    assert_observed_in_order(event_bus_adapter, event_bus_adapter.read(event_bus), [full, bare])


# --- the wire form (not adapter-specific) --------------------------------------------------


@pytest.mark.parametrize("event_type", list(EventType))
def test_events_round_trip_through_json(event_type: EventType) -> None:
    original = ConnectionEvent(
        type=event_type,
        connection_id="c1",
        occurred_at=datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC),
        idempotency_key=ConnectionEvent.key_for(event_type, "c1", "d"),
        version=2,
        expires_at=datetime(2026, 2, 3, 5, 5, 6, tzinfo=UTC),
        error_code="server_error",
        failure_class="transient",
        consecutive_failures=1,
    )
    wire = json.loads(json.dumps(original.to_json()))
    assert ConnectionEvent.from_json(wire) == original
    assert wire["type"] == event_type.value
    assert wire["occurred_at"] == "2026-02-03T04:05:06Z"


def test_an_event_with_only_required_fields_round_trips() -> None:
    original = ConnectionEvent(
        type=EventType.ROTATED,
        connection_id="c1",
        occurred_at=datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC),
        idempotency_key="k",
    )
    wire = json.loads(json.dumps(original.to_json()))
    assert ConnectionEvent.from_json(wire) == original
    assert wire["expires_at"] is None and wire["version"] is None
