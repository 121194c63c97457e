"""Fan-out: one scheduled tick becomes N worker ticks that Cloud Functions runs in parallel.

When one refresher instance cannot carry the due set (a raised Secret Manager quota, many
projects), the scheduled tick does no refreshing itself: it publishes ``shards`` messages, one
per shard, to the fan-out topic, and the worker function -- a Pub/Sub-triggered Cloud Function
that the platform scales out up to its ``max_instance_count`` -- runs one ordinary tick per
message. Nothing here schedules or queues: Cloud Scheduler triggers, Pub/Sub carries and
redelivers, Eventarc and Cloud Functions run the workers (docs/gcp.md, "Fan-out").

**Shards partition the connections; the lease keeps each one single-handed.** A shard is a
range of slots (:class:`~tokenbroker.kernel.model.Shard`: a connection's slot is a hash of its
id), and a worker's tick claims only connections of its shard
(:meth:`~tokenbroker.ports.StateStore.claim_due` with ``shard=``): workers on different shards
never read or contend for the same documents, so they scale out instead of fighting over the
earliest-due ones. Within a shard the lease still rules: ``claim_due`` takes only connections
nobody holds a live lease on, in one transaction per chunk, so a duplicated or redelivered
shard message refreshes nothing twice. Each worker claims at most its ``limit`` (the worker's
``tick_limit``), so ``shards * limit`` is what one scheduled tick can carry. A shard whose
worker fails waits for its redelivery or the next scheduled tick: nothing else takes it.

Before publishing, the scheduled call asks the state store to :meth:`prepare_shards
<tokenbroker.ports.StateStore.prepare_shards>`: a store that indexes the slot (Firestore)
writes it on records that predate it, so a sharded claim finds every connection.

Values in, values out: the plan and the messages are built here; publishing goes through a
:class:`ShardPublisher` the entry point supplies (the Pub/Sub client, built once per instance).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tokenbroker.kernel.errors import BadRequest, ConfigError
from tokenbroker.kernel.model import Shard

#: The message attribute that marks a fan-out message (filterable without parsing the body).
SHARD_ATTRIBUTE = "tokenbroker_shard"
#: More shards than this is a mistake, not a deployment: each is one worker invocation.
MAX_SHARDS = 1000


def shard_payload(shard: Shard) -> dict[str, Any]:
    """What a shard's message says: ``{"shard": index, "shards": count}``."""
    return {"shard": shard.index, "shards": shard.count}


def shard_message(shard: Shard) -> bytes:
    """The message body: the payload as compact JSON (what the worker's trigger parses)."""
    return json.dumps(shard_payload(shard), separators=(",", ":")).encode()


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
        fanout.topic, [shard_message(s) for s in shards], {SHARD_ATTRIBUTE: str(fanout.shards)}
    )
    return {"fanned_out": len(shards), "shards": fanout.shards, "topic": fanout.topic}
