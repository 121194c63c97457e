"""The refresher's fan-out path: the scheduled call prepares the store's shard fields, then
publishes; a shard's call runs a tick over that shard only (tests/system/test_fanout.py runs
the same on real processes and emulators)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from tokenbroker.entrypoints import refresher
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.errors import StoreUnavailable
from tokenbroker.kernel.model import Shard
from tokenbroker.refresh.fanout import FanOut


class Publisher:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.topics: list[tuple[str, Mapping[str, str]]] = []

    def publish(self, topic: str, messages: Sequence[bytes], attributes: Mapping[str, str]) -> None:
        self.topics.append((topic, attributes))
        self.messages.extend(messages)


class State:
    """The memory state store, whose ``prepare_shards`` and ``claim_due`` are watched."""

    def __init__(self, inner: Any, *, prepare_fails: bool) -> None:
        self.inner = inner
        self.prepare_fails = prepare_fails
        self.prepared = 0
        self.shards: list[Shard | None] = []

    def prepare_shards(self) -> int:
        self.prepared += 1
        if self.prepare_fails:
            raise StoreUnavailable("Firestore: deadline exceeded")
        return 0

    def claim_due(self, now: Any, **kwargs: Any) -> Any:
        self.shards.append(kwargs.get("shard"))
        return self.inner.claim_due(now, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def fanned(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Runtime, Publisher]]:
    runtime = build_runtime(Settings(backend="memory"))
    publisher = Publisher()
    monkeypatch.setattr(refresher, "_fanout", FanOut(3, "projects/p/topics/t"))
    monkeypatch.setattr(refresher, "_shard_publisher", publisher)
    yield runtime, publisher
    runtime.close()


@pytest.mark.parametrize("prepare_fails", [False, True], ids=["prepared", "store-failing"])
def test_the_scheduled_call_prepares_the_shards_then_publishes_them(
    monkeypatch: pytest.MonkeyPatch, fanned: tuple[Runtime, Publisher], prepare_fails: bool
) -> None:
    """A store that cannot write the shard fields now does not stop the fan-out: the records
    that have them are refreshed, and the next scheduled call tries again."""
    runtime, publisher = fanned
    state = State(runtime.state, prepare_fails=prepare_fails)
    monkeypatch.setattr(refresher, "_runtime", replace(runtime, state=state))
    answer = refresher.run_tick(None)
    assert answer["fanned_out"] == 3
    assert len(publisher.messages) == 3
    assert publisher.topics == [("projects/p/topics/t", {"tokenbroker_shard": "3"})]
    assert state.prepared == 1
    assert state.shards == []  # the scheduled call refreshes nothing itself


def test_a_shard_call_claims_only_its_shard(
    monkeypatch: pytest.MonkeyPatch, fanned: tuple[Runtime, Publisher]
) -> None:
    runtime, publisher = fanned
    state = State(runtime.state, prepare_fails=False)
    monkeypatch.setattr(refresher, "_runtime", replace(runtime, state=state))
    refresher.run_tick({"shard": 2, "shards": 3})
    assert state.shards == [Shard(2, 3)]
    assert state.prepared == 0 and publisher.messages == []
    # A named refresh inside a shard's payload is the named connections, not the shard's.
    state.shards.clear()
    refresher.run_tick({"shard": 2, "shards": 3, "connections": ["x"]})
    assert state.shards == []
