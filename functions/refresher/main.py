"""Refresher: one refresh tick per trigger. A thin adapter over tokenbroker.

Deploy ``refresh`` for a Pub/Sub/CloudEvent trigger (Cloud Scheduler -> Pub/Sub) or
``refresh_http`` for Cloud Scheduler's HTTP target. With fan-out on
(``TOKENBROKER_FANOUT_SHARDS`` > 1), the scheduled call publishes one message per shard and
``refresh``, deployed again on the fan-out topic, is the worker that runs each shard's tick.
"""

from typing import Any

import functions_framework

from tokenbroker.entrypoints import refresher


@functions_framework.cloud_event
def refresh(cloud_event: Any) -> None:
    refresher.handle_cloud_event(cloud_event)


@functions_framework.http
def refresh_http(request: Any) -> tuple[str, int, dict[str, str]]:
    return refresher.handle_http(request)
