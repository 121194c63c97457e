"""Fan-out: one scheduled tick becomes N worker ticks that Cloud Functions runs in parallel.

When one refresher instance cannot carry the due set (a raised Secret Manager quota, many
projects), the scheduled tick does no refreshing itself: it publishes ``shards`` messages, one
per shard, to the fan-out topic, and the worker function -- a Pub/Sub-triggered Cloud Function
that the platform scales out up to its ``max_instance_count`` -- runs one ordinary tick per
message. Nothing here schedules or queues: Cloud Scheduler triggers, Pub/Sub carries and
redelivers, Eventarc and Cloud Functions run the workers (docs/gcp.md, "Fan-out").

**What keeps the shards apart is the lease, not a partition.** Every worker tick claims due
connections through :meth:`~tokenbroker.ports.StateStore.claim_due`, which takes only
connections nobody holds a live lease on, in one transaction per chunk: two workers never hold
the same connection, so each connection is refreshed once, by one of them, whatever the
number of shards, duplicated messages or redeliveries. A shard is a *slot* (index and count,
logged with the worker's tick) and a share: each worker claims at most its ``limit`` (the
worker's ``tick_limit``), so ``shards * limit`` is what one scheduled tick can carry. The price
is that workers starting together compete for the earliest-due documents in their claim
transactions (``bench/fanout.py`` measures it on the emulator); a ``shard`` field on the state
document and a filter in ``claim_due`` would remove it, at the cost of a port change.

Values in, values out: the plan and the messages are built here; publishing goes through a
:class:`ShardPublisher` the entry point supplies (the Pub/Sub client, built once per instance).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenbroker.kernel.errors import BadRequest, ConfigError

#: The message attribute that marks a fan-out message (filterable without parsing the body).
SHARD_ATTRIBUTE = "tokenbroker_shard"
#: More shards than this is a mistake, not a deployment: each is one worker invocation.
MAX_SHARDS = 1000


@dataclass(frozen=True)
class Shard:
    """One worker's slot in a fan-out: ``index`` of ``count``."""

    index: int
    count: int

    def payload(self) -> dict[str, Any]:
        return {"shard": self.index, "shards": self.count}

    def data(self) -> bytes:
        """The message body: the payload as compact JSON (what the worker's trigger parses)."""
        return json.dumps(self.payload(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class FanOut:
    """Fan-out is on: ``shards`` worker ticks per scheduled tick, published to ``topic``."""

    shards: int
    topic: str

    def plan(self) -> list[Shard]:
        return [Shard(index, self.shards) for index in range(self.shards)]


class ShardPublisher(Protocol):
    """Publishes message bodies to a topic and returns once every one is accepted (raises a
    retryable :class:`~tokenbroker.kernel.errors.StoreUnavailable` otherwise)."""

    def publish(
        self, topic: str, messages: Sequence[bytes], attributes: Mapping[str, str]
    ) -> None: ...


def parse_fanout(
    shards: str | None,
    topic: str | None,
    *,
    shards_variable: str,
    topic_variable: str,
    project: str | None,
) -> FanOut | None:
    """The fan-out setting from its variables' raw values; ``None`` when fan-out is off
    (``shards`` unset, empty or 1). A bad value is a :class:`ConfigError` naming the variable."""
    raw = (shards or "").strip()
    if not raw:
        return None
    try:
        count = int(raw)
    except ValueError:
        raise ConfigError(f"{shards_variable}: {raw!r} is not a whole number") from None
    if not 1 <= count <= MAX_SHARDS:
        raise ConfigError(f"{shards_variable}: {count} is outside 1..{MAX_SHARDS}")
    if count == 1:
        return None
    name = (topic or "").strip()
    if not name:
        raise ConfigError(f"{topic_variable}: required when {shards_variable} is above 1")
    if not name.startswith("projects/"):
        if not project:
            raise ConfigError(f"{topic_variable}: a full topic path, or a project to name it in")
        name = f"projects/{project}/topics/{name}"
    return FanOut(count, name)


def shard_of(payload: Mapping[str, Any] | None) -> Shard | None:
    """The shard a trigger's payload names (``{"shard": i, "shards": n}``), ``None`` when it
    names none. A payload that names one badly is refused rather than fanned out again."""
    if not payload or ("shard" not in payload and "shards" not in payload):
        return None
    index, count = _whole(payload.get("shard")), _whole(payload.get("shards"))
    if index is None or count is None or not 0 <= index < count <= MAX_SHARDS:
        raise BadRequest('a shard payload is {"shard": i, "shards": n} with 0 <= i < n')
    return Shard(index, count)


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fan_out(fanout: FanOut, publisher: ShardPublisher) -> dict[str, Any]:
    """Publish one message per shard; the summary the scheduled tick answers with."""
    shards = fanout.plan()
    publisher.publish(
        fanout.topic, [s.data() for s in shards], {SHARD_ATTRIBUTE: str(fanout.shards)}
    )
    return {"fanned_out": len(shards), "shards": fanout.shards, "topic": fanout.topic}
