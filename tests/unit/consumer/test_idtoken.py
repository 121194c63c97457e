"""The caller's ID-token sources: static (token or file), google-auth, and the default."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.unit.consumer.fakes import URL, jwt
from tokenbroker.consumer import (
    GoogleIdTokenSource,
    IdTokenError,
    StaticIdTokenSource,
    default_id_token_source,
    jwt_expiry,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import ConfigError


def test_static_source_token_file_and_expiry(tmp_path: Path, clock: FakeClock) -> None:
    live = jwt({"exp": int((clock.now() + timedelta(hours=1)).timestamp())})
    assert jwt_expiry(live) == clock.now() + timedelta(hours=1)
    assert jwt_expiry("opaque") is None
    source = StaticIdTokenSource(live, clock=clock)
    assert source("aud") == live
    assert live not in repr(source)

    path = tmp_path / "id-token"
    path.write_text(live + "\n")
    from_file = StaticIdTokenSource(path=path, clock=clock)
    assert from_file("aud") == live
    path.write_text("rotated-value")
    assert from_file("aud") == "rotated-value"  # re-read on every call

    clock.advance(3600)
    with pytest.raises(IdTokenError, match="expired"):
        source("aud")
    with pytest.raises(IdTokenError, match="cannot read"):
        StaticIdTokenSource(path=tmp_path / "missing")("aud")
    with pytest.raises(ConfigError):
        StaticIdTokenSource()
    with pytest.raises(ConfigError):
        StaticIdTokenSource("x", path=path)


def test_default_source_resolution(tmp_path: Path) -> None:
    assert isinstance(default_id_token_source({"TOKENBROKER_ID_TOKEN": "t"}), StaticIdTokenSource)
    path = tmp_path / "tok"
    path.write_text("from-file")
    from_file = default_id_token_source({"TOKENBROKER_ID_TOKEN_FILE": str(path)})
    assert from_file("aud") == "from-file"
    assert isinstance(default_id_token_source({}), GoogleIdTokenSource)


class _FakeIdCredentials:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.token: str | None = None
        self.expiry: datetime | None = None
        self.refreshes = 0

    def refresh(self, request: Any) -> None:  # noqa: ARG002 - google-auth's signature
        self.refreshes += 1
        self.token = f"google-id-{self.refreshes}"
        self.expiry = (self.clock.now() + timedelta(hours=1)).replace(tzinfo=None)  # naive UTC


def test_google_source_caches_until_five_minutes_before_expiry(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    from google.oauth2 import id_token

    made: list[tuple[str, _FakeIdCredentials]] = []

    def fetch(audience: str, request: Any = None) -> _FakeIdCredentials:
        credentials = _FakeIdCredentials(clock)
        made.append((audience, credentials))
        return credentials

    monkeypatch.setattr(id_token, "fetch_id_token_credentials", fetch)
    source = GoogleIdTokenSource(clock=clock)
    assert source(URL) == "google-id-1"
    clock.advance(3600 - 301)
    assert source(URL) == "google-id-1"
    clock.advance(2)
    assert source(URL) == "google-id-2"
    assert len(made) == 1  # credentials are built once per audience, then refreshed
    source.invalidate(URL)
    assert source(URL) == "google-id-1"  # new credentials after an invalidate
    assert [audience for audience, _ in made] == [URL, URL]


def test_google_source_errors_keep_their_retryability(
    monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    from google.auth import exceptions
    from google.oauth2 import id_token

    failures: list[Exception] = [
        exceptions.DefaultCredentialsError("Neither metadata server or valid service account"),
        exceptions.RefreshError(exceptions.TransportError("metadata unreachable")),
        exceptions.TransportError("metadata unreachable"),
    ]

    def fetch(audience: str, request: Any = None) -> Any:
        raise failures.pop(0)

    monkeypatch.setattr(id_token, "fetch_id_token_credentials", fetch)
    source = GoogleIdTokenSource(clock=clock)
    outcomes = []
    for _ in range(3):
        with pytest.raises(IdTokenError) as raised:
            source(URL)
        outcomes.append(raised.value.retryable)
    assert outcomes == [False, True, True]
