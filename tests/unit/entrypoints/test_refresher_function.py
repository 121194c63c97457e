"""The refresher function in process: ``functions/refresher/main.py`` through
``functions_framework.create_app(...).test_client()``, for both targets.

``refresh_http`` (Cloud Scheduler's HTTP target) and ``refresh`` (a CloudEvent: Scheduler ->
Pub/Sub -> Eventarc) run a real tick over the embedded backend against a token endpoint on
127.0.0.1. What the platform sees matters: a 5xx makes Scheduler or Eventarc try again, so a
store outage must be one (503 with Retry-After on HTTP), a bad trigger must not (400/405), and
a configuration error is a 500 that names the variable to fix (an operator surface).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import functions_framework
import pytest

from tests.support.logs import ROUTES, json_lines, trace_fields
from tests.support.provider_api import ProviderApi
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.adapters.fake_provider import FakeTokenServer
from tokenbroker.adapters.memory import MemoryEventBus, MemoryStateStore
from tokenbroker.entrypoints import refresher
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import StoreFault, StoreUnavailable
from tokenbroker.kernel.log import capture_logs
from tokenbroker.kernel.model import Connection, ConnectionEvent, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.ports import ClaimBatch
from tokenbroker.refresh.registry import ConnectionRegistry

SOURCE = str(Path(__file__).resolve().parents[3] / "functions" / "refresher" / "main.py")


class UnavailableState(MemoryStateStore):
    """A state store in an outage: every read the tick needs fails, retryably."""

    def _down(self) -> StoreUnavailable:
        return StoreUnavailable("state store unavailable", retry_after=7)

    def parked_events(self, *_: object, **__: object) -> list[ConnectionEvent]:
        raise self._down()

    def claim_due(self, *_: object, **__: object) -> ClaimBatch:
        raise self._down()

    def claim(self, *_: object, **__: object) -> ClaimBatch:
        raise self._down()


class Broker:
    """The embedded backend shared by the test and the function, and the provider."""

    def __init__(self, state_dir: Path, api: ProviderApi, token_server: FakeTokenServer) -> None:
        self.key = new_key_text()
        self.state_dir = state_dir
        self.token_server = token_server
        self.runtime = build_runtime(
            Settings(backend="embedded", state_dir=state_dir, encryption_key=Secret(self.key))
        )
        registry = ConnectionRegistry(
            secrets=self.runtime.secrets, state=self.runtime.state,
            profiles=self.runtime.profiles, clock=self.runtime.clock,
        )  # fmt: skip
        for cid in ("crm", "erp"):
            registry.register(
                Connection(id=cid, profile="generic", grant=GrantType.REFRESH_TOKEN,
                           client_id="client", token_url=f"{api.url}/oauth/token"),
                Credential(refresh_token=Secret(token_server.seed_refresh_token()),
                           client_secret=Secret("client-secret")),
            )  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        return {
            "TOKENBROKER_BACKEND": "embedded",
            "TOKENBROKER_STATE_DIR": str(self.state_dir),
            "TOKENBROKER_ENCRYPTION_KEY": self.key,
            "TOKENBROKER_HTTP_TIMEOUT_SECONDS": "5",
        }

    def versions(self) -> dict[str, int]:
        return {cid: self.runtime.secrets.get(cid).version for cid in ("crm", "erp")}


@pytest.fixture
def broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Broker]:
    token_server = FakeTokenServer()
    with ProviderApi(token_server=token_server).in_thread() as api:
        broker = Broker(tmp_path / "state", api, token_server)
        for name, value in broker.env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(refresher, "_runtime", None)  # a cold start per test
        try:
            yield broker
        finally:
            built = refresher._runtime
            if built is not None:
                built.close()
            broker.runtime.close()


@pytest.fixture
def outage(monkeypatch: pytest.MonkeyPatch) -> Runtime:
    """The instance's runtime, with its state store down (a FakeClock: retries do not wait)."""
    runtime = replace(
        build_runtime(Settings(backend="memory")), state=UnavailableState(), clock=FakeClock()
    )
    monkeypatch.setattr(refresher, "_runtime", runtime)
    return runtime


def client(target: str) -> Any:
    return functions_framework.create_app(target, SOURCE).test_client()


def pubsub_event(payload: object | None) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent as Eventarc delivers a Pub/Sub message from Cloud Scheduler."""
    data = base64.b64encode(json.dumps(payload).encode()).decode() if payload is not None else ""
    body = {
        "message": {"data": data, "messageId": "1", "publishTime": "2026-11-27T10:00:00Z"},
        "subscription": "projects/p/subscriptions/refresher",
    }
    headers = {
        "ce-id": str(uuid.uuid4()),
        "ce-specversion": "1.0",
        "ce-source": "//pubsub.googleapis.com/projects/p/topics/refresh-tick",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "Content-Type": "application/json",
    }
    return headers, json.dumps(body).encode()


# --- refresh_http --------------------------------------------------------------------------------


def test_http_post_runs_the_tick_its_payload_asks_for(broker: Broker) -> None:
    response = client("refresh_http").post("/", json={"connections": ["crm"]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    summary = response.get_json()
    assert (summary["claimed"], summary["refreshed"], summary["missing"]) == (1, 1, [])
    assert broker.versions() == {"crm": 2, "erp": 1}  # only what was named


def test_http_post_without_a_payload_refreshes_what_is_due(broker: Broker) -> None:
    response = client("refresh_http").post("/")
    assert response.status_code == 200, response.text
    assert response.get_json()["refreshed"] == 2
    assert broker.versions() == {"crm": 2, "erp": 2}


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_http_other_methods_are_405(broker: Broker, method: str) -> None:
    response = client("refresh_http").open("/", method=method)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.get_json()["error"] == "invalid_request"
    assert broker.versions() == {"crm": 1, "erp": 1}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"tick"'])
def test_http_a_body_that_is_not_a_json_object_is_400(broker: Broker, body: bytes) -> None:
    response = client("refresh_http").post("/", data=body, content_type="application/json")
    assert response.status_code == 400
    assert response.get_json() == {
        "error": "invalid_request", "error_description": "body must be a JSON object",
    }  # fmt: skip
    assert broker.versions() == {"crm": 1, "erp": 1}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/octet-stream",  # what Cloud Scheduler sends with a body, by default
        "text/plain",
        "application/json; charset=utf-8",
        "application/x-www-form-urlencoded",  # the form parser must not eat the body
        None,
    ],
)
def test_http_a_scheduler_body_runs_its_tick_whatever_its_content_type(
    broker: Broker, content_type: str | None
) -> None:
    """Cloud Scheduler HTTP targets send ``Content-Type: application/octet-stream`` by default
    when the job has a body (https://cloud.google.com/scheduler/docs/reference/rest/v1/projects.locations.jobs#HttpTarget):
    the body is read as JSON whatever the header says."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = client("refresh_http").post("/", data=b'{"connections": ["crm"]}', headers=headers)
    assert response.status_code == 200, response.text
    assert response.get_json()["refreshed"] == 1
    assert broker.versions() == {"crm": 2, "erp": 1}


@pytest.mark.parametrize("content_type", ["application/octet-stream", "application/json", None])
def test_http_an_empty_scheduler_body_refreshes_what_is_due(
    broker: Broker, content_type: str | None
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client("refresh_http").post("/", data=b"", headers=headers)
    assert response.status_code == 200, response.text
    assert broker.versions() == {"crm": 2, "erp": 2}


@pytest.mark.parametrize("body", [b"tick", b"[1]", b"\xff\xfe"])
def test_http_an_octet_stream_body_that_is_not_a_json_object_is_400_and_changes_nothing(
    broker: Broker, body: bytes
) -> None:
    response = client("refresh_http").post(
        "/", data=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 400
    assert response.get_json()["error_description"] == "body must be a JSON object"
    assert broker.versions() == {"crm": 1, "erp": 1}


def test_http_a_store_outage_is_503_with_retry_after(outage: Runtime) -> None:
    response = client("refresh_http").post("/", json={})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"  # what the store said
    assert response.get_json()["error"] == "store_unavailable"
    assert outage.clock.sleeps  # retried (without waiting) before giving up


def test_http_a_configuration_error_is_500_naming_the_variable(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENBROKER_TICK_LIMIT", "0")
    response = client("refresh_http").post("/", json={})
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"] == "invalid_config"
    assert "TOKENBROKER_TICK_LIMIT" in body["error_description"]
    assert "Traceback" not in response.text


# --- refresh (CloudEvent) -------------------------------------------------------------------------


def test_cloudevent_runs_the_tick_its_pubsub_payload_asks_for(broker: Broker) -> None:
    headers, body = pubsub_event({"connections": ["erp"]})
    response = client("refresh").post("/", headers=headers, data=body)
    assert response.status_code == 200, response.text
    assert broker.versions() == {"crm": 1, "erp": 2}


def test_cloudevent_with_no_payload_refreshes_what_is_due(broker: Broker) -> None:
    headers, body = pubsub_event(None)
    assert client("refresh").post("/", headers=headers, data=body).status_code == 200
    assert broker.versions() == {"crm": 2, "erp": 2}


def test_cloudevent_get_is_405(broker: Broker) -> None:
    assert client("refresh").get("/").status_code == 405
    assert broker.versions() == {"crm": 1, "erp": 1}


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b'{"connections": ["crm"]}', 400),  # JSON, but no CloudEvent
        ("text/plain", b"tick", 415),
    ],
)
def test_cloudevent_a_body_that_is_no_cloudevent_is_refused(
    broker: Broker, content_type: str, body: bytes, status: int
) -> None:
    response = client("refresh").post("/", headers={"Content-Type": content_type}, data=body)
    assert response.status_code == status
    assert broker.versions() == {"crm": 1, "erp": 1}


def test_cloudevent_a_store_outage_fails_the_invocation_so_eventarc_retries(
    outage: Runtime,
) -> None:
    headers, body = pubsub_event({})
    response = client("refresh").post("/", headers=headers, data=body)
    assert response.status_code == 500
    assert "state store unavailable" not in response.text  # the framework's bare crash answer


def test_cloudevent_a_configuration_error_is_acknowledged_not_redelivered_forever(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception makes Eventarc's Pub/Sub subscription redeliver the event with backoff
    (10-600 s) for the message retention, 24 h by default
    (https://cloud.google.com/eventarc/docs/retry-events): a configuration error fails the
    same way every time, so the invocation succeeds (the message is acknowledged) and the
    ERROR line names the variable; the next scheduled tick tries again anyway."""
    monkeypatch.setenv("TOKENBROKER_TICK_LIMIT", "0")
    headers, body = pubsub_event({})
    response = client("refresh").post("/", headers=headers, data=body)
    assert response.status_code == 200, response.text
    # The cold start configures the one logger on stderr (so no capture_logs here).
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    (refused,) = [line for line in lines if line["message"] == "tick failed, not retried"]
    assert refused["severity"] == "ERROR"
    assert refused["error_code"] == "invalid_config"
    assert "TOKENBROKER_TICK_LIMIT" in refused["error"]
    assert broker.versions() == {"crm": 1, "erp": 1}


# --- a failed tick fails the invocation; every tick logs one summary line ------------------------


class BuggyState(MemoryStateStore):
    """A state store with a bug: claiming raises ``ValueError`` (not a broker error)."""

    def claim_due(self, *_: object, **__: object) -> ClaimBatch:
        raise ValueError("boom: a bug")


class DownBus(MemoryEventBus):
    def publish(self, *_: object, **__: object) -> None:
        raise StoreUnavailable("bus down", retryable=False)


def summary_lines(logs: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in logs.splitlines()]
    return [line for line in lines if line["message"] == "tick summary"]


@pytest.fixture
def preset(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Runtime]:
    """Install a memory runtime (with some adapters swapped) as the instance's runtime."""

    def install(**adapters: Any) -> Runtime:
        runtime = replace(build_runtime(Settings(backend="memory")), **adapters)
        monkeypatch.setattr(refresher, "_runtime", runtime)
        return runtime

    return install


@pytest.fixture
def provider() -> Iterator[tuple[ProviderApi, FakeTokenServer]]:
    server = FakeTokenServer()
    with ProviderApi(token_server=server).in_thread() as api:
        yield api, server


def register(runtime: Runtime, api: ProviderApi, server: FakeTokenServer) -> None:
    runtime.registry().register(
        Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                   client_id="client", token_url=f"{api.url}/oauth/token"),
        Credential(refresh_token=Secret(server.seed_refresh_token()),
                   client_secret=Secret("client-secret")),
    )  # fmt: skip


def test_http_a_tick_that_raises_a_bug_is_500_and_logged_with_its_traceback(
    preset: Callable[..., Runtime],
) -> None:
    preset(state=BuggyState())
    with capture_logs() as logs:
        response = client("refresh_http").post("/", json={})
    assert response.status_code == 500
    assert response.get_json()["error"] == "internal_error"
    assert "boom" not in response.text and "Traceback" not in response.text
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    (crash,) = [line for line in lines if line["message"].startswith("tick crashed")]
    assert "ValueError: boom: a bug" in crash["exception"]
    (summary,) = summary_lines(logs.getvalue())
    assert (summary["ok"], summary["error_code"], summary["trigger"]) == (
        False, "internal_error", "http",
    )  # fmt: skip


def test_cloudevent_a_tick_that_raises_a_bug_fails_the_invocation(
    preset: Callable[..., Runtime],
) -> None:
    preset(state=BuggyState())
    headers, body = pubsub_event({})
    with capture_logs() as logs:
        response = client("refresh").post("/", headers=headers, data=body)
    assert response.status_code == 500  # Eventarc redelivers
    (summary,) = summary_lines(logs.getvalue())
    assert (summary["ok"], summary["trigger"]) == (False, "cloudevent")


def test_http_a_tick_that_cannot_publish_is_503_so_the_scheduler_retries_and_alerts(
    preset: Callable[..., Runtime], provider: tuple[ProviderApi, FakeTokenServer]
) -> None:
    """The bus is down: the events stay in the outbox (committed with the state), the
    refresh is kept, and the invocation fails so that the retry relays them and alerts."""
    runtime = preset(events=DownBus())
    register(runtime, *provider)
    with capture_logs() as logs:
        response = client("refresh_http").post("/", json={})
    assert response.status_code == 503
    assert response.headers["retry-after"]
    assert response.get_json()["error"] == "tick_incomplete"
    assert "event" in response.get_json()["error_description"]
    (summary,) = summary_lines(logs.getvalue())
    assert (summary["ok"], summary["refreshed"], summary["events_parked"]) == (False, 1, 1)
    assert runtime.secrets.get("crm").version == 2  # the refresh itself is kept
    assert [e.type.value for e in runtime.state.parked_events(10)] == ["credential.rotated"]


def test_every_tick_logs_one_summary_line_with_ok_counts_and_seconds(
    preset: Callable[..., Runtime], provider: tuple[ProviderApi, FakeTokenServer]
) -> None:
    runtime = preset()
    register(runtime, *provider)
    with capture_logs() as logs:
        first = client("refresh_http").post("/", json={})
        second = client("refresh_http").post("/", json={})
    assert (first.status_code, second.status_code) == (200, 200)
    one, two = summary_lines(logs.getvalue())
    assert (one["ok"], one["due"], one["refreshed"]) == (True, 1, 1)
    assert (two["ok"], two["due"], two["refreshed"]) == (True, 0, 0)
    for line in (one, two):
        assert line["severity"] == "INFO"
        assert isinstance(line["seconds"], float)
        assert set(line["failed"]) == {"transient", "permanent", "internal"}


class FaultyState(MemoryStateStore):
    """A state store that refuses the tick for good (a permission or schema problem)."""

    def claim_due(self, *_: object, **__: object) -> ClaimBatch:
        raise StoreFault("state store refused the query: permission denied")


def test_cloudevent_a_permanent_store_fault_is_acknowledged_and_logged(
    preset: Callable[..., Runtime],
) -> None:
    preset(state=FaultyState())
    headers, body = pubsub_event({})
    with capture_logs() as logs:
        response = client("refresh").post("/", headers=headers, data=body)
    assert response.status_code == 200  # redelivery would fail the same way for 24 h
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    (refused,) = [line for line in lines if line["message"] == "tick failed, not retried"]
    assert (refused["severity"], refused["error_code"]) == ("ERROR", "store_fault")
    (summary,) = summary_lines(logs.getvalue())
    assert summary["ok"] is False


def test_http_a_permanent_store_fault_is_500_not_503(preset: Callable[..., Runtime]) -> None:
    """Scheduler retries any non-2xx only as the job's retryConfig says; 503 would tell the
    operator to wait, 500 says something must be fixed."""
    preset(state=FaultyState())
    response = client("refresh_http").post("/", data=b"{}")
    assert response.status_code == 500
    assert response.get_json()["error"] == "store_fault"
    assert "retry-after" not in response.headers


# --- logs: the invocation's trace on every line -------------------------------------------------

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
TRACED = {
    "logging.googleapis.com/trace": f"projects/tb-proj/traces/{TRACE_ID}",
    "logging.googleapis.com/spanId": "00f067aa0ba902b7",
    "logging.googleapis.com/trace_sampled": True,
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_http_every_line_of_a_traced_invocation_carries_its_trace_and_none_after(
    preset: Callable[..., Runtime], provider: tuple[ProviderApi, FakeTokenServer], route: str
) -> None:
    register(preset(), *provider)
    with ROUTES[route](), capture_logs("debug", project="tb-proj") as logs:
        traced = client("refresh_http").post("/", json={}, headers={"traceparent": TRACEPARENT})
        during = logs.getvalue()
        legacy = client("refresh_http").post(
            "/", json={}, headers={"X-Cloud-Trace-Context": f"{TRACE_ID}/74;o=1"}
        )
        after_legacy = len(logs.getvalue())
        plain = client("refresh_http").post("/", json={})
    assert (traced.status_code, legacy.status_code, plain.status_code) == (200, 200, 200)
    lines = json_lines(during)
    assert "credential rotated" in [line["message"] for line in lines]  # the tick's own lines
    assert summary_lines(during) and all(trace_fields(line) == TRACED for line in lines)
    (legacy_summary,) = summary_lines(logs.getvalue()[len(during) : after_legacy])
    assert legacy_summary["logging.googleapis.com/spanId"] == "000000000000004a"
    assert all(trace_fields(line) == {} for line in json_lines(logs.getvalue()[after_legacy:]))


@pytest.mark.parametrize(
    "extra",
    [
        {"ce-traceparent": TRACEPARENT},  # the CloudEvent's distributed tracing attribute
        {"traceparent": TRACEPARENT},  # the delivering request's header (Cloud Run adds it)
        {"X-Cloud-Trace-Context": f"{TRACE_ID}/1;o=1", "ce-traceparent": "not a trace"},
    ],
)
def test_cloudevent_the_lines_of_a_traced_delivery_carry_its_trace(
    preset: Callable[..., Runtime], extra: dict[str, str]
) -> None:
    preset()
    headers, body = pubsub_event({})
    with capture_logs("debug", project="tb-proj") as logs:
        response = client("refresh").post("/", headers={**headers, **extra}, data=body)
        client("refresh").post("/", headers=headers, data=body)  # then one without
    assert response.status_code == 200, response.text
    triggered = [
        line for line in json_lines(logs.getvalue()) if line["message"] == "tick triggered"
    ]
    first, second = triggered
    assert (
        trace_fields(first)["logging.googleapis.com/trace"]
        == TRACED["logging.googleapis.com/trace"]
    )
    assert trace_fields(second) == {}
    one, two = summary_lines(logs.getvalue())
    assert trace_fields(one) == trace_fields(first) and trace_fields(two) == {}
