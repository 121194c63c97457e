"""Where the caller's ID token comes from: explicit argument, then environment, then google-auth."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenbroker.consumer import (
    ENV_ID_TOKEN,
    ENV_ID_TOKEN_FILE,
    ClientSettings,
    GoogleIdTokenSource,
    StaticIdTokenSource,
    default_id_token_source,
)


def test_the_variable_names_are_the_documented_ones() -> None:
    assert ENV_ID_TOKEN == "TOKENBROKER_ID_TOKEN"
    assert ENV_ID_TOKEN_FILE == "TOKENBROKER_ID_TOKEN_FILE"
    docs = (Path(__file__).parents[3] / "docs" / "client.md").read_text()
    assert f"`{ENV_ID_TOKEN}`" in docs and f"`{ENV_ID_TOKEN_FILE}`" in docs


def test_nothing_set_means_google_auth() -> None:
    assert ClientSettings.resolve(environ={}) == ClientSettings()
    assert isinstance(default_id_token_source({}), GoogleIdTokenSource)


def test_environment_token_then_file_and_empty_values_count_as_unset(tmp_path: Path) -> None:
    both = ClientSettings.resolve(environ={ENV_ID_TOKEN: "t", ENV_ID_TOKEN_FILE: "/f"})
    assert both.id_token is not None and both.id_token.reveal() == "t"
    assert both.id_token_file is None
    only_file = ClientSettings.resolve(environ={ENV_ID_TOKEN: "", ENV_ID_TOKEN_FILE: "/f"})
    assert only_file == ClientSettings(id_token_file=Path("/f"))
    assert ClientSettings.resolve(environ={ENV_ID_TOKEN: "", ENV_ID_TOKEN_FILE: ""}) == (
        ClientSettings()
    )


def test_explicit_arguments_win_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "id-token"
    path.write_text("from-the-file\n")
    environ = {ENV_ID_TOKEN: "from-the-environment"}
    settings = ClientSettings.resolve(id_token_file=path, environ=environ)
    assert settings == ClientSettings(id_token_file=path)  # the env token does not sneak in
    assert default_id_token_source(settings=settings)("aud") == "from-the-file"
    explicit = ClientSettings.resolve(id_token="explicit", environ=environ)
    assert default_id_token_source(settings=explicit)("aud") == "explicit"


def test_os_environ_is_read_when_no_mapping_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_ID_TOKEN, "from-os-environ")
    monkeypatch.delenv(ENV_ID_TOKEN_FILE, raising=False)
    source = default_id_token_source()
    assert isinstance(source, StaticIdTokenSource)
    assert source("aud") == "from-os-environ"


def test_the_token_never_prints() -> None:
    settings = ClientSettings.resolve(environ={ENV_ID_TOKEN: "eyJ-a-caller-id-token"})
    assert "eyJ-a-caller-id-token" not in repr(settings)
    assert "eyJ-a-caller-id-token" not in str(settings)
