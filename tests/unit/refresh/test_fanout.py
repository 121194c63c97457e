"""Fan-out's plan and messages (values in, values out); publishing through a recording fake."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest

from tokenbroker.kernel.errors import BadRequest, ConfigError
from tokenbroker.kernel.model import Shard
from tokenbroker.refresh.fanout import (
    MAX_SHARDS,
    SHARD_ATTRIBUTE,
    FanOut,
    fan_out,
    parse_fanout,
    shard_message,
    shard_of,
    shard_payload,
)

VARIABLES = {"shards_variable": "SHARDS_VAR", "topic_variable": "TOPIC_VAR"}


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, list[bytes], dict[str, str]]] = []

    def publish(self, topic: str, messages: Sequence[bytes], attributes: Mapping[str, str]) -> None:
        self.published.append((topic, list(messages), dict(attributes)))


@pytest.mark.parametrize("raw", [None, "", "  ", "1"])
def test_fan_out_is_off_unless_shards_is_above_one(raw: str | None) -> None:
    assert parse_fanout(raw, None, project="p", **VARIABLES) is None


def test_a_short_topic_name_is_placed_in_the_project() -> None:
    assert parse_fanout("4", "fanout", project="p", **VARIABLES) == FanOut(
        4, "projects/p/topics/fanout"
    )
    full = "projects/other/topics/t"
    assert parse_fanout(" 2 ", full, project=None, **VARIABLES) == FanOut(2, full)


@pytest.mark.parametrize(
    ("shards", "topic", "project", "named"),
    [
        ("four", "t", "p", "SHARDS_VAR"),
        ("0", "t", "p", "SHARDS_VAR"),
        (str(MAX_SHARDS + 1), "t", "p", "SHARDS_VAR"),
        ("3", None, "p", "TOPIC_VAR"),
        ("3", "t", None, "TOPIC_VAR"),
    ],
)
def test_a_bad_setting_names_its_variable(
    shards: str, topic: str | None, project: str | None, named: str
) -> None:
    with pytest.raises(ConfigError, match=named) as raised:
        parse_fanout(shards, topic, project=project, **VARIABLES)
    assert raised.value.code == "invalid_config"


def test_fan_out_publishes_one_message_per_shard() -> None:
    publisher = RecordingPublisher()
    summary = fan_out(FanOut(3, "projects/p/topics/t"), publisher)
    assert summary == {"fanned_out": 3, "shards": 3, "topic": "projects/p/topics/t"}
    [(topic, messages, attributes)] = publisher.published
    assert topic == "projects/p/topics/t"
    assert [json.loads(m) for m in messages] == [
        {"shard": 0, "shards": 3},
        {"shard": 1, "shards": 3},
        {"shard": 2, "shards": 3},
    ]
    assert attributes == {SHARD_ATTRIBUTE: "3"}


def test_each_published_message_reads_back_as_its_shard() -> None:
    for shard in FanOut(5, "projects/p/topics/t").plan():
        assert shard_of(json.loads(shard_message(shard))) == shard


@pytest.mark.parametrize("payload", [None, {}, {"limit": 10}, {"connections": ["a"]}])
def test_a_payload_without_a_shard_names_none(payload: dict[str, object] | None) -> None:
    assert shard_of(payload) is None


@pytest.mark.parametrize(
    "payload",
    [
        {"shard": 0},
        {"shards": 2},
        {"shard": 2, "shards": 2},
        {"shard": -1, "shards": 2},
        {"shard": True, "shards": 2},
        {"shard": "0", "shards": 2},
        {"shard": 0, "shards": MAX_SHARDS + 1},
    ],
)
def test_a_malformed_shard_is_refused_never_fanned_out_again(payload: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        shard_of(payload)


def test_a_shard_payload_is_its_index_and_count() -> None:
    assert shard_payload(Shard(1, 4)) == {"shard": 1, "shards": 4}
