"""The refresher function's logic: parse the trigger, run one tick, render the summary.

Triggers: a CloudEvent (Cloud Scheduler -> Pub/Sub -> Eventarc, or any CloudEvent) or a plain
HTTP POST (Cloud Scheduler's HTTP target). An optional JSON payload narrows the tick:
``{"connections": ["id", ...]}`` or ``{"limit": 500}``.

Per-connection failures are part of a successful tick (they are recorded and announced). What
a failed tick answers follows the trigger's retry rules:

* **HTTP** (Cloud Scheduler's HTTP target, with an OIDC token that Cloud Run's IAM front end
  checks before the request arrives): the body is read as JSON *whatever its Content-Type*
  -- with a body, Scheduler sends ``application/octet-stream`` unless the job sets a header --
  and may be empty. Scheduler counts any answer outside 200-299 as a failed attempt and
  retries it only as the job's ``retryConfig`` says (``retryCount`` 0-5, default 0), then waits
  for the next scheduled run (https://cloud.google.com/scheduler/docs/configuring/retry-jobs):
  nothing is retried forever, so the status says what happened, for the operator and the
  alert: a store that cannot be reached (503 with ``Retry-After``), results left uncommitted or
  events lost (503 ``tick_incomplete``), a configuration error (500 ``invalid_config`` naming
  the variable), an unexpected exception (500 ``internal_error``, the traceback in the log,
  never in the answer), a bad trigger (400/405: nothing is done).
* **CloudEvent** (Scheduler -> Pub/Sub -> Eventarc): an exception fails the invocation, and
  Eventarc's Pub/Sub subscription redelivers the event with exponential backoff (10-600 s) for
  the message retention, 24 h by default (https://cloud.google.com/eventarc/docs/retry-events).
  So only a failure that another try can cure raises: a retryable error (a store outage, a tick
  left incomplete) and an unexpected exception (its cause is unknown). A non-retryable broker
  error -- a configuration error above all -- fails the same way on every redelivery: it is
  logged (``tick failed, not retried``, severity ERROR, naming what to fix) and the event is
  acknowledged -- as Google's retry sample does with a misconfigured client, which "will stay
  broken until the function is redeployed"
  (https://cloud.google.com/functions/docs/samples/functions-cloudevent-tips-retry); the next
  scheduled tick tries again anyway. (Redelivery needs the trigger's retry policy
  ``RETRY_POLICY_RETRY``; https://cloud.google.com/functions/docs/writing/retries.)

Every tick logs one ``tick summary`` line with ``ok``, the counts and the seconds.

**Fan-out** (:mod:`tokenbroker.refresh.fanout`, docs/gcp.md "Fan-out"): with
``TOKENBROKER_FANOUT_SHARDS`` above 1, a trigger whose payload names no shard refreshes nothing
itself; it publishes one ``{"shard": i, "shards": n}`` message per shard to
``TOKENBROKER_FANOUT_TOPIC`` and answers ``{"fanned_out": n, ...}``. The worker function (this
module's ``refresh`` entry point on that topic) runs one tick per shard message over the due
connections of that shard only (``claim_due(shard=...)``); a payload that names a shard is
never fanned out again. Before publishing, the scheduled call has the state store
``prepare_shards`` (records older than the slot field get one). A publish that fails is
retryable (503 / redelivery): a shard published twice only starts a tick that finds its due
set leased.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from tokenbroker.entrypoints.answers import bug_answer, http_answer
from tokenbroker.entrypoints.compose import Runtime, build_runtime, start_logging
from tokenbroker.entrypoints.health import TickCrashed, observed_tick
from tokenbroker.entrypoints.settings import named_variable
from tokenbroker.kernel import trace
from tokenbroker.kernel.errors import (
    BadRequest,
    ConfigError,
    MethodNotAllowed,
    StoreUnavailable,
    TokenBrokerError,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.refresh.fanout import FanOut, ShardPublisher, fan_out, parse_fanout, shard_of

#: Worker ticks per scheduled tick (unset or 1: no fan-out, the scheduled tick refreshes).
ENV_FANOUT_SHARDS = "TOKENBROKER_FANOUT_SHARDS"
#: The topic the worker function is triggered from (``projects/P/topics/T`` or ``T``).
ENV_FANOUT_TOPIC = "TOKENBROKER_FANOUT_TOPIC"
#: The most one fan-out waits for Pub/Sub to accept its messages, in seconds.
FANOUT_PUBLISH_TIMEOUT = 30.0

#: Publish failures that another try cannot cure (a missing topic, a missing role).
_FANOUT_CONFIG_ERRORS = frozenset({"NotFound", "PermissionDenied", "InvalidArgument"})

_runtime: Runtime | None = None
_lock = threading.Lock()
_UNREAD: Any = object()
#: The fan-out setting, read once per instance on first use (``None``: off).
_fanout: FanOut | None = _UNREAD
#: The fan-out topic's publisher, built on the first fan-out and reused.
_shard_publisher: ShardPublisher | None = None


def runtime() -> Runtime:
    """The instance's runtime, built on the first invocation (cold start) and reused."""
    global _runtime  # noqa: PLW0603 - one per function instance, by design
    if _runtime is None:
        with _lock:
            if _runtime is None:
                start_logging()
                _runtime = build_runtime(metrics_job="refresher")
    return _runtime


class PubSubShardPublisher:
    """:class:`~tokenbroker.refresh.fanout.ShardPublisher` on a Pub/Sub ``PublisherClient``
    (imported on first use: only a fanning-out instance pays for it; it talks to
    ``PUBSUB_EMULATOR_HOST`` when that is set, as the client library documents)."""

    def __init__(self, timeout: float = FANOUT_PUBLISH_TIMEOUT) -> None:
        self.timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from google.cloud import pubsub_v1  # type: ignore[attr-defined]  # noqa: PLC0415

                    self._client = pubsub_v1.PublisherClient()
        return self._client

    def publish(self, topic: str, messages: Sequence[bytes], attributes: Mapping[str, str]) -> None:
        try:
            futures = [self.client.publish(topic, data, **attributes) for data in messages]
            for future in futures:
                future.result(timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001 - google's errors do not leave the entry point
            reason = type(exc).__name__
            if reason in _FANOUT_CONFIG_ERRORS:  # the same on every retry: fix the deployment
                raise ConfigError(
                    f"{ENV_FANOUT_TOPIC}: publishing to {topic} failed ({reason})"
                ) from None
            raise StoreUnavailable(f"fan-out: publishing to {topic} failed ({reason})") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.stop()


def fanout_setting() -> FanOut | None:
    """The instance's fan-out setting, read from the environment on first use."""
    global _fanout  # noqa: PLW0603 - one per function instance, by design
    if _fanout is _UNREAD:
        project = None
        raw_topic = named_variable(ENV_FANOUT_TOPIC)
        if raw_topic and not raw_topic.strip().startswith("projects/"):
            try:
                project = _started().settings.project
            except ConfigError:
                project = None
        _fanout = parse_fanout(
            named_variable(ENV_FANOUT_SHARDS),
            raw_topic,
            shards_variable=ENV_FANOUT_SHARDS,
            topic_variable=ENV_FANOUT_TOPIC,
            project=project,
        )
    return _fanout


def shard_publisher() -> ShardPublisher:
    global _shard_publisher  # noqa: PLW0603 - one per function instance, by design
    if _shard_publisher is None:
        with _lock:
            if _shard_publisher is None:
                _shard_publisher = PubSubShardPublisher()
    return _shard_publisher


def _options(payload: Mapping[str, Any] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if not payload:
        return options
    connections = payload.get("connections")
    if isinstance(connections, list) and all(isinstance(c, str) for c in connections):
        options["connection_ids"] = connections
    limit = payload.get("limit")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        options["limit"] = limit
    return options


def _json_mapping(raw: bytes | str) -> Mapping[str, Any] | None:
    try:
        decoded = json.loads(raw)
    except ValueError:
        return None  # a scheduler body that is not JSON just means "run a tick"
    return decoded if isinstance(decoded, Mapping) else None


def _payload_from_event_data(data: Any) -> Mapping[str, Any] | None:
    """The JSON payload of a CloudEvent: Pub/Sub ``message.data`` (base64) or the data itself."""
    if isinstance(data, Mapping) and isinstance(data.get("message"), Mapping):
        raw = data["message"].get("data")
        try:
            return _json_mapping(base64.b64decode(raw)) if raw else None
        except ValueError:
            return None
    if isinstance(data, Mapping):
        return data
    if isinstance(data, bytes | str) and data:
        return _json_mapping(data)
    return None


def _started() -> Runtime:
    """The runtime; a configuration that cannot start is logged (the answer names it too)."""
    try:
        return runtime()
    except TokenBrokerError as error:
        get_logger(component="refresher-function").error(
            "refresher cannot start", error_code=error.code, error=error.message
        )
        raise


def run_tick(payload: Mapping[str, Any] | None = None, *, trigger: str = "http") -> dict[str, Any]:
    """One tick as the payload narrows it; raises the :class:`TokenBrokerError` that failed it.

    With fan-out on, a payload that names no shard (nor connections) publishes the shards
    instead and returns what it published; a shard's payload runs the worker's tick."""
    runtime = _started()
    shard = shard_of(payload)
    fanout = fanout_setting()
    log = get_logger(component="refresher-function")
    if shard is None and fanout is not None and not (payload and "connections" in payload):
        # Records older than the shard fields would match no shard's claim: give them theirs.
        # Best effort: a store that cannot do it now must not stop the fan-out (the records
        # that have them are refreshed; the next scheduled call tries again).
        try:
            placed = runtime.state.prepare_shards()
        except TokenBrokerError as error:
            log.warning(
                "shard fields not written; retried at the next scheduled tick",
                error_code=error.code,
                error=error.message,
            )
        else:
            if placed:
                log.info("records given their shard fields", records=placed)
        summary = fan_out(fanout, shard_publisher())
        log.info("tick fanned out", trigger=trigger, **summary)
        return summary
    options = _options(payload)
    if shard is not None:
        log.info("shard tick", trigger=trigger, shard=shard.index, shards=shard.count)
        if "connection_ids" not in options:
            options["shard"] = shard
    result = asyncio.run(observed_tick(runtime, trigger=trigger, **options))
    if isinstance(result, TokenBrokerError):
        raise result
    return result.to_json()


def _event_trace(event: Any) -> trace.TraceContext | None:
    """A CloudEvent's trace: its ``traceparent`` attribute (the CloudEvents distributed tracing
    extension, https://github.com/cloudevents/spec/blob/main/cloudevents/extensions/distributed-tracing.md),
    else the trace headers of the HTTP request that delivered it (Cloud Run adds them), when the
    functions framework (Flask) is serving one."""
    get = getattr(event, "get", None)
    context = trace.parse_traceparent(get("traceparent") if callable(get) else None)
    if context is not None:
        return context
    try:
        import flask  # noqa: PLC0415 - the functions framework's, present when it serves
    except ImportError:  # pragma: no cover - the refresher runs under the framework
        return None
    return trace.from_header_map(flask.request.headers) if flask.has_request_context() else None


def handle_cloud_event(event: Any) -> dict[str, Any] | None:
    """The tick's summary; ``None`` when it failed for good (logged, the event acknowledged).
    Raises when another delivery can succeed: the framework then answers 500 and Eventarc
    redelivers (see the module docstring)."""
    traced = trace.enter(_event_trace(event))
    log = get_logger(component="refresher-function")
    try:
        _started()  # configures logging from the settings before the first line
        payload = _payload_from_event_data(event.data)
        log.info(
            "tick triggered", trigger="cloudevent", event_type=event["type"], event_id=event["id"]
        )
        return run_tick(payload, trigger="cloudevent")
    except TokenBrokerError as error:
        if error.retryable or isinstance(error, TickCrashed):
            raise
        log.error(
            "tick failed, not retried",
            error_code=error.code,
            error=error.message,
            event_id=event["id"],
        )
        return None
    finally:
        trace.leave(traced)


def _http_payload(request: Any) -> Mapping[str, Any] | None:
    """The job's JSON object, read whatever the Content-Type says (Scheduler sends
    ``application/octet-stream`` by default); ``None`` for an empty body."""
    if request.method != "POST":
        raise MethodNotAllowed(("POST",))
    # The raw bytes, never the form parser: a form Content-Type would otherwise eat the body.
    raw: bytes = request.get_data(cache=True, parse_form_data=False)
    if not raw.strip():
        return None
    payload = _json_mapping(raw)
    if payload is None:
        raise BadRequest("body must be a JSON object")
    return payload


def handle_http(request: Any) -> tuple[str, int, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    log = get_logger(component="refresher-function")
    traced = trace.enter(trace.from_header_map(request.headers))
    try:
        summary = run_tick(_http_payload(request))
    except TokenBrokerError as error:
        # A failed tick is logged by its summary line; a refused trigger needs no line.
        answer = http_answer(error, public=False)
    except Exception:  # a bug outside the tick: logged with its traceback, never shown
        log.exception("refresher invocation crashed")
        answer = bug_answer()
    else:
        return json.dumps(summary), 200, headers
    finally:
        trace.leave(traced)
    return answer.json(), answer.status, {**headers, **answer.headers}
