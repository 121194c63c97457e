"""The refresher as a deployed function: a real functions-framework process receiving a
Cloud Scheduler-style CloudEvent, over the embedded backend shared with the test."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support.oidc import RT_BASIC_ID, RT_BASIC_SECRET, OidcServer
from tests.system.helpers import add_refresh_connection, embedded_runtime, outbox
from tests.system.processes import REPO, functions_framework
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.entrypoints.compose import Runtime
from tokenbroker.kernel.model import ClientAuthMethod, EventType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "refresher" / "main.py"


def _scheduler_event(payload: dict[str, object] | None = None) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent as Eventarc delivers a Pub/Sub message from Cloud Scheduler."""
    data = base64.b64encode(json.dumps(payload or {}).encode()).decode()
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


def _shared_state(state_dir: Path) -> tuple[Runtime, dict[str, str]]:
    """A runtime for the test and the environment for the function, on the same state."""
    key = new_key_text()
    env = {
        "TOKENBROKER_BACKEND": "embedded",
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
    }
    return embedded_runtime(state_dir, encryption_key=Secret(key)), env


def _add(rt: Runtime, oidc: OidcServer, cid: str) -> str:
    return add_refresh_connection(
        rt, oidc, cid, client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )  # fmt: skip


def test_cloudevent_triggers_one_tick(tmp_path: Path, oidc: OidcServer) -> None:
    rt, env = _shared_state(tmp_path / "state")
    try:
        original = _add(rt, oidc, "crm")
        with functions_framework("refresh", SOURCE, env, name="refresher-cloudevent") as url:
            headers, body = _scheduler_event()
            response = httpx.post(url, headers=headers, content=body, timeout=30)
            assert response.status_code == 200, response.text
            stored = rt.secrets.get("crm")
            assert stored.version == 2
            assert stored.credential.refresh_token is not None
            assert stored.credential.refresh_token.reveal() != original
            assert [e.type for e in outbox(rt)] == [EventType.ROTATED]

            # A second scheduler tick finds nothing due and changes nothing.
            headers, body = _scheduler_event()
            assert httpx.post(url, headers=headers, content=body, timeout=30).status_code == 200
            assert rt.secrets.get("crm").version == 2
            assert oidc.stats()["invalid_grant"] == 0
    finally:
        rt.close()


def test_http_target_and_bad_requests(tmp_path: Path, oidc: OidcServer) -> None:
    rt, env = _shared_state(tmp_path / "state")
    try:
        _add(rt, oidc, "erp")
        with functions_framework("refresh_http", SOURCE, env, name="refresher-http") as url:
            assert httpx.get(url, timeout=10).status_code == 405
            bad = httpx.post(url, content=b"[1,2]", headers={"Content-Type": "application/json"})
            assert bad.status_code == 400
            assert bad.json()["error"] == "invalid_request"
            # As Cloud Scheduler sends a job's body: application/octet-stream by default.
            response = httpx.post(
                url,
                content=b'{"connections": ["erp"]}',
                headers={"Content-Type": "application/octet-stream"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            summary = response.json()
            assert summary["refreshed"] == 1
            assert summary["failed"] == {"transient": 0, "permanent": 0, "internal": 0}
            assert "Traceback" not in response.text
    finally:
        rt.close()


def test_wrong_key_fails_clearly_without_touching_state(tmp_path: Path, oidc: OidcServer) -> None:
    rt = embedded_runtime(tmp_path / "state")
    rt.close()
    env = {
        "TOKENBROKER_STATE_DIR": str(tmp_path / "state"),
        "TOKENBROKER_ENCRYPTION_KEY": new_key_text(),
    }
    with functions_framework("refresh_http", SOURCE, env, name="refresher-wrong-key") as url:
        response = httpx.post(url, json={}, timeout=30)
        assert response.status_code == 500
        assert response.json()["error"] == "invalid_config"
        assert "does not decrypt" in response.json()["error_description"]
