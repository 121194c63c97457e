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
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Mapping
from typing import Any

from tokenbroker.entrypoints.answers import bug_answer, http_answer
from tokenbroker.entrypoints.compose import Runtime, build_runtime, start_logging
from tokenbroker.entrypoints.health import TickCrashed, observed_tick
from tokenbroker.kernel import trace
from tokenbroker.kernel.errors import BadRequest, MethodNotAllowed, TokenBrokerError
from tokenbroker.kernel.log import get_logger

_runtime: Runtime | None = None
_lock = threading.Lock()


def runtime() -> Runtime:
    """The instance's runtime, built on the first invocation (cold start) and reused."""
    global _runtime  # noqa: PLW0603 - one per function instance, by design
    if _runtime is None:
        with _lock:
            if _runtime is None:
                start_logging()
                _runtime = build_runtime(metrics_job="refresher")
    return _runtime


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
    """One tick as the payload narrows it; raises the :class:`TokenBrokerError` that failed it."""
    result = asyncio.run(observed_tick(_started(), trigger=trigger, **_options(payload)))
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
