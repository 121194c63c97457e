"""Every event type the refresher emits matches the documented schema (docs/event.schema.json)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.unit.refresh.test_authorize import Rig, connected_event
from tests.unit.refresh.test_tick import World
from tokenbroker.kernel.errors import TransportError
from tokenbroker.kernel.http import HttpResponse
from tokenbroker.kernel.model import EventType
from tokenbroker.kernel.retry import RetryPolicy

SCHEMA = json.loads((Path(__file__).parents[3] / "docs" / "event.schema.json").read_text())


def validate(event: dict[str, object]) -> None:
    jsonschema.Draft202012Validator(
        SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(event)


def test_all_event_types_match_the_schema() -> None:
    world = World()
    world.add("ok")
    world.add("flaky")
    rt = world.add("dead")
    world.tick(connection_ids=["ok"])
    world.server.script = [TransportError("down")]
    world.tick(world.refresher(retry=RetryPolicy(attempts=1)), connection_ids=["flaky"])
    world.tick(connection_ids=["flaky"])
    world.server.revoke(rt)
    world.tick(connection_ids=["dead"])
    world.add("risky")  # refreshed once, then an answer lost on the wire: at risk
    world.tick(connection_ids=["risky"])
    world.server.script = [TransportError("read timed out")]
    world.tick(connection_ids=["risky"])
    emitted = [e.to_json() for e in world.events.events]
    # The authorization flow's events (connection.connected; its connection.recovered is
    # the refresher's type and shape).
    emitted.append(connected_event(Rig()).to_json())
    assert {e["type"] for e in emitted} == {t.value for t in EventType}
    for event in emitted:
        validate(event)


def test_schema_rejects_token_fields() -> None:
    world = World()
    world.add("ok")
    world.tick()
    event = world.events.events[0].to_json()
    with pytest.raises(jsonschema.ValidationError):
        validate({**event, "access_token": "x"})


def test_idempotency_keys_are_stable_per_happening() -> None:
    world = World()
    world.add("a")
    world.tick()
    first = world.events.events[0]
    again = type(first).key_for(first.type, first.connection_id, f"v{first.version}")
    assert again == first.idempotency_key
    world.tick(connection_ids=["a"])
    assert world.events.events[1].idempotency_key != first.idempotency_key


def test_events_round_trip() -> None:
    world = World()
    world.add("a")
    world.server.script = [HttpResponse(400, b'{"error":"invalid_client"}')]
    world.tick()
    event = world.events.events[0]
    assert type(event).from_json(event.to_json()) == event
