"""The issuer's identity settings: ``TOKENBROKER_CALLER_IDENTITY`` and the audiences list."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenbroker.entrypoints.compose import build_issuer
from tokenbroker.entrypoints.settings import ENV_CALLER_IDENTITY, ENV_ISSUER_AUDIENCE, Settings
from tokenbroker.issue.idtoken import IdentityMode
from tokenbroker.kernel.errors import ConfigError

FUNCTIONS_URL = "https://europe-west1-proj.cloudfunctions.net/tokenbroker-issuer"
RUN_URL = "https://tokenbroker-issuer-abc123xyz-ew.a.run.app"


def test_defaults_are_verify_mode_and_no_audience() -> None:
    settings = Settings.from_env({})
    assert settings.caller_identity == "verify"
    assert settings.issuer_audiences == ()


def test_both_urls_of_the_function_are_one_setting() -> None:
    settings = Settings.from_env(
        {ENV_ISSUER_AUDIENCE: f" {FUNCTIONS_URL} , {RUN_URL},", ENV_CALLER_IDENTITY: "Platform"}
    )
    assert settings.issuer_audiences == (FUNCTIONS_URL, RUN_URL)
    assert settings.caller_identity == "platform"


@pytest.mark.parametrize(
    "env",
    [
        {ENV_CALLER_IDENTITY: "trust-me"},
        {ENV_CALLER_IDENTITY: "none"},
        {ENV_ISSUER_AUDIENCE: "https://a.example/ x"},
        {ENV_ISSUER_AUDIENCE: ",".join(f"https://f{i}.example" for i in range(17))},
        {ENV_ISSUER_AUDIENCE: "https://a.example/\x00"},
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str]) -> None:
    (named,) = env
    with pytest.raises(ConfigError, match=named) as caught:
        Settings.from_env(env)
    assert len(caught.value.message) < 200


def test_a_bad_mode_exits_2_naming_the_field(tmp_path: Path) -> None:
    env = {**os.environ, ENV_CALLER_IDENTITY: "trust-me", "TOKENBROKER_STATE_DIR": str(tmp_path)}
    env.pop("TOKENBROKER_ENCRYPTION_KEY", None)
    done = subprocess.run(
        [sys.executable, "-c", "from tokenbroker.entrypoints.console import main; main()", "list"],
        capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    shown = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 2, shown
    assert ENV_CALLER_IDENTITY in shown
    assert "Traceback" not in shown


def test_platform_mode_builds_without_fetching_keys(tmp_path: Path) -> None:
    """Platform mode never verifies a signature, so the cold start does not fetch Google's
    keys (an unreachable keys URL would otherwise be a failed fetch in the log)."""
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n")
    settings = Settings(
        backend="memory",
        policy_file=policy,
        issuer_audiences=(FUNCTIONS_URL, RUN_URL),
        caller_identity="platform",
        id_token_keys_url="http://127.0.0.1:9/unreachable",
    )
    service = build_issuer(settings)
    try:
        verifier = service.issuer.verifier
        assert verifier.mode is IdentityMode.PLATFORM  # type: ignore[attr-defined]
        assert verifier.audiences == {FUNCTIONS_URL, RUN_URL}  # type: ignore[attr-defined]
        assert verifier.keys.fetches == 0  # type: ignore[attr-defined]
        assert service.relay.verifier is verifier
    finally:
        service.runtime.close()


def test_the_audience_is_still_required(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("version = 1\n")
    with pytest.raises(ConfigError, match=ENV_ISSUER_AUDIENCE):
        build_issuer(Settings(backend="memory", policy_file=policy, caller_identity="platform"))
