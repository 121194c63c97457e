"""A worker that follows tokenbroker's connection events on Pub/Sub. Copy and adapt.

    TOKENBROKER_EVENTS_SUBSCRIPTION=projects/P/subscriptions/tokenbroker-events-billing \\
    TOKENBROKER_BACKEND=gcp TOKENBROKER_GCP_PROJECT=P  python examples/subscriber.py

The subscription needs message ordering enabled (docs/pubsub.md). Handlers must be idempotent:
an event whose handler raised comes back, and duplicates are possible.
"""

from __future__ import annotations

import functools
import os

from tokenbroker.kernel.errors import NotFound
from tokenbroker.kernel.model import ConnectionEvent, EventType, StoredCredential
from tokenbroker.ports import SecretStore
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.consumer.subscriber import subscribe

credentials: dict[str, StoredCredential] = {}  # what this worker calls providers with


@functools.cache
def secret_store() -> SecretStore:
    return build_runtime().secrets  # configured like the broker: TOKENBROKER_BACKEND, ...


def on_event(event: ConnectionEvent) -> None:
    cid = event.connection_id
    if event.type is EventType.ROTATED:
        cached = credentials.get(cid)
        if cached is None or event.version is None or cached.version < event.version:
            try:  # any other error propagates: the event is nacked and comes back later
                credentials[cid] = secret_store().get(cid)
                print(f"{cid}: now using credential v{credentials[cid].version}", flush=True)
            except NotFound:  # the connection was removed meanwhile
                credentials.pop(cid, None)
    elif event.type is EventType.NEEDS_REAUTH:
        print(f"ALERT {cid} needs re-authorisation ({event.error_code})", flush=True)


if __name__ == "__main__":
    subscription = os.environ["TOKENBROKER_EVENTS_SUBSCRIPTION"]
    stream = subscribe(subscription, on_event)
    print(f"listening on {subscription}", flush=True)
    try:
        stream.result()
    except KeyboardInterrupt:
        stream.cancel()
        stream.result()
