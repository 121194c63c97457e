"""The Firestore authorization sessions (emulator) keep the PKCE verifier sealed, bound to
its document, under the deployment's session key."""

from __future__ import annotations

import base64
import secrets
import uuid
from collections.abc import Iterator

import pytest

from tests.contract.test_authorization_sessions import session
from tests.support.emulators import emulator
from tokenbroker.adapters.gcp.firestore_sessions import FirestoreAuthorizationSessions
from tokenbroker.kernel.errors import ConfigError, CorruptCredential, NotFound
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system


def _key() -> Secret:
    return Secret(base64.b64encode(secrets.token_bytes(32)).decode())


@pytest.fixture
def project() -> str:
    emulator("firestore")
    return f"tb-sessions-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def opened(project: str) -> Iterator[list[FirestoreAuthorizationSessions]]:
    handles: list[FirestoreAuthorizationSessions] = []
    yield handles
    for handle in handles:
        handle.close()


def _open(
    project: str, key: Secret, opened: list[FirestoreAuthorizationSessions]
) -> FirestoreAuthorizationSessions:
    handle = FirestoreAuthorizationSessions(
        session_key=key, project=project, emulator_host=emulator("firestore").host
    )
    opened.append(handle)
    return handle


def test_the_verifier_is_not_in_the_document(
    project: str, opened: list[FirestoreAuthorizationSessions]
) -> None:
    sessions = _open(project, _key(), opened)
    stored = session()
    sessions.put(stored)
    data = sessions._doc("k1").get().to_dict()
    assert stored.code_verifier.reveal().encode() not in data["sealed_verifier"]
    assert stored.code_verifier.reveal() not in repr(data)
    assert data["expires_at"] == stored.expires_at  # the TTL policy's field, a timestamp


def test_a_moved_blob_or_another_key_does_not_open(
    project: str, opened: list[FirestoreAuthorizationSessions]
) -> None:
    key = _key()
    sessions = _open(project, key, opened)
    sessions.put(session("a", cid="one"))
    sessions.put(session("b", cid="two"))
    blob = sessions._doc("a").get().get("sealed_verifier")
    sessions._doc("b").update({"sealed_verifier": blob})
    with pytest.raises(CorruptCredential):
        sessions.take("b")
    with pytest.raises(NotFound):  # consumed all the same: single use
        sessions.take("b")
    with pytest.raises(CorruptCredential):
        _open(project, _key(), opened).take("a")


def test_a_malformed_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        FirestoreAuthorizationSessions(session_key=Secret("c2hvcnQ="))
    with pytest.raises(ConfigError, match="base64"):
        FirestoreAuthorizationSessions(session_key=Secret("not base64 !"))
