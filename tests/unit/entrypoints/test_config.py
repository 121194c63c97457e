"""Configuration errors name the field; profiles are strict data."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from tokenbroker.entrypoints.settings import BOUNDS, Settings
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.model import Connection, GrantType, validate_connection_id
from tokenbroker.oauth.profiles import load_profiles, parse_profiles


def test_settings_resolve_explicit_then_env_then_default() -> None:
    env = {"TOKENBROKER_CONCURRENCY": "32", "TOKENBROKER_TICK_LIMIT": "50"}
    settings = Settings.from_env(env, tick_limit=7)
    assert settings.tick_limit == 7  # explicit wins
    assert settings.concurrency == 32  # then the environment
    assert settings.http_timeout == 10.0  # then the default


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TOKENBROKER_CONCURRENCY": "many"}, "TOKENBROKER_CONCURRENCY"),
        ({"TOKENBROKER_CONCURRENCY": "0"}, "TOKENBROKER_CONCURRENCY"),
        ({"TOKENBROKER_OVERLAP_FRACTION": "2"}, "TOKENBROKER_OVERLAP_FRACTION"),
        ({"TOKENBROKER_BACKEND": "s3"}, "TOKENBROKER_BACKEND"),
        ({"TOKENBROKER_LEASE_TTL_SECONDS": "5"}, "TOKENBROKER_LEASE_TTL_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_builtin_profiles() -> None:
    profiles = load_profiles()
    assert {"generic", "google", "zoho"} <= set(profiles)
    zoho = profiles["zoho"]
    for dc, host in {
        "us": "accounts.zoho.com",
        "eu": "accounts.zoho.eu",
        "in": "accounts.zoho.in",
    }.items():
        connection = Connection(
            id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN, params={"data_centre": dc}
        )
        assert zoho.token_url_for(connection) == f"https://{host}/oauth/v2/token"
    default = Connection(id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN)
    assert zoho.token_url_for(default) == "https://accounts.zoho.com/oauth/v2/token"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"p": {"grants": ["refresh_token"], "token_uri": "x"}}, "p.token_uri"),
        ({"p": {"grants": ["password"]}}, "p.grants[0]"),
        ({"p": {"grants": "refresh_token"}}, "p.grants"),
        ({"p": {}}, "p.grants"),
        (
            {"p": {"grants": ["refresh_token"], "default_lifetime_seconds": "1h"}},
            "p.default_lifetime_seconds",
        ),
        (
            {"p": {"grants": ["refresh_token"], "params": {"dc": {"valuez": {}}}}},
            "p.params.dc.valuez",
        ),
    ],
)
def test_profile_errors_name_the_field(data: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_profiles(data, "profiles")
    assert named in str(caught.value)


def test_profiles_file_overlays_and_reports_its_path(tmp_path: Path) -> None:
    extra = tmp_path / "p.toml"
    extra.write_text(
        '[omie]\ngrants = ["client_credentials"]\ntoken_url = "https://app.omie.com.br/token"\n'
    )
    assert "omie" in load_profiles(extra)
    extra.write_text("[omie\n")
    with pytest.raises(ConfigError, match=str(extra)):
        load_profiles(extra)


def test_connection_params_are_checked_against_the_profile() -> None:
    zoho = load_profiles()["zoho"]
    with pytest.raises(ConfigError, match="data_centre"):
        zoho.check_connection(
            Connection(
                id="z",
                profile="zoho",
                grant=GrantType.REFRESH_TOKEN,
                params={"data_centre": "mars"},
            )
        )
    with pytest.raises(ConfigError, match="region"):
        zoho.check_connection(
            Connection(
                id="z", profile="zoho", grant=GrantType.REFRESH_TOKEN, params={"region": "eu"}
            )
        )
    with pytest.raises(ConfigError, match="not supported"):
        zoho.check_connection(Connection(id="z", profile="zoho", grant=GrantType.JWT_BEARER))
    generic = load_profiles()["generic"]
    with pytest.raises(ConfigError, match="token_url is required"):
        generic.check_connection(
            Connection(id="g", profile="generic", grant=GrantType.REFRESH_TOKEN)
        )


@pytest.mark.parametrize("bad", ["", "UPPER", "-lead", "a/b", "x" * 64, "sp ace"])
def test_connection_ids_are_validated(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_connection_id(bad)


def test_presets_and_per_port_overrides() -> None:
    assert Settings.from_env({}).adapters == ("embedded", "embedded", "outbox")
    assert Settings.from_env({"TOKENBROKER_BACKEND": "gcp"}).adapters == (
        "secret-manager",
        "firestore",
        "pubsub",
    )
    mixed = Settings.from_env(
        {"TOKENBROKER_BACKEND": "gcp", "TOKENBROKER_SECRET_STORE": "aws-secrets-manager"}
    )
    assert mixed.adapters == ("aws-secrets-manager", "firestore", "pubsub")
    with pytest.raises(ConfigError, match="TOKENBROKER_EVENT_BUS"):
        Settings.from_env({"TOKENBROKER_EVENT_BUS": "kafka"})


def test_gcp_settings_need_a_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    settings = Settings.from_env({"TOKENBROKER_BACKEND": "gcp"})
    with pytest.raises(ConfigError, match="TOKENBROKER_GCP_PROJECT"):
        _ = settings.project
    named = Settings.from_env({"TOKENBROKER_GCP_PROJECT": "p1", "TOKENBROKER_PUBSUB_TOPIC": "t1"})
    assert named.topic_path == "projects/p1/topics/t1"
    full = Settings.from_env({"TOKENBROKER_PUBSUB_TOPIC": "projects/other/topics/x"})
    assert full.topic_path == "projects/other/topics/x"


def test_building_a_gcp_runtime_imports_no_cloud_client_until_used() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tokenbroker.entrypoints.compose import build_runtime\n"
        "from tokenbroker.entrypoints.settings import Settings\n"
        "rt = build_runtime(Settings(backend='gcp', gcp_project='p'))\n"
        "heavy = [m for m in sys.modules if m.startswith(('google.cloud.secretmanager',"
        " 'google.cloud.firestore', 'google.cloud.pubsub', 'grpc'))]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_log_settings_resolve_explicit_then_env_then_default(tmp_path: Path) -> None:
    from tokenbroker.entrypoints.settings import LogSettings

    env = {"TOKENBROKER_LOG_LEVEL": "ERROR", "TOKENBROKER_LOG_FILE": str(tmp_path / "x.log")}
    assert LogSettings.from_env(env, level="debug").level == "debug"
    assert LogSettings.from_env(env) == LogSettings("error", tmp_path / "x.log")
    assert LogSettings.from_env({}, default_level="warning") == LogSettings("warning", None)


def test_a_bad_log_level_names_the_variable() -> None:
    from tokenbroker.entrypoints.settings import LogSettings

    with pytest.raises(ConfigError, match=r"TOKENBROKER_LOG_LEVEL.*verbose"):
        LogSettings.from_env({"TOKENBROKER_LOG_LEVEL": "verbose"})


def test_google_and_xdg_variables_are_read_by_settings_only(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"GOOGLE_CLOUD_PROJECT": "proj-1", "XDG_STATE_HOME": str(tmp_path)}
    )
    assert settings.project == "proj-1"
    assert settings.resolved_state_dir == tmp_path / "tokenbroker"
    explicit = Settings.from_env(
        {"GOOGLE_CLOUD_PROJECT": "proj-1", "TOKENBROKER_GCP_PROJECT": "proj-2"}
    )
    assert explicit.project == "proj-2"


@pytest.mark.parametrize(
    "value", ["inf", "-inf", "nan", "NaN", "1e309", "1e15", "99999999999999999999", "-1e308"]
)
@pytest.mark.parametrize("variable", [b.variable for b in BOUNDS])
def test_every_numeric_setting_refuses_non_finite_and_huge_values(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=variable) as caught:
        Settings.from_env({variable: value})
    assert "\n" not in caught.value.message


def test_every_numeric_setting_has_a_bound_and_its_defaults_lie_within() -> None:
    numeric = {
        f.name for f in fields(Settings) if f.type in ("int", "float") or f.type in (int, float)
    }
    assert numeric == {b.field for b in BOUNDS}
    Settings.from_env({})  # every default passes its own bound
    for bound in BOUNDS:
        edge = float(bound.high if not bound.open_high else bound.high / 2)
        Settings.from_env({bound.variable: str(int(edge) if edge.is_integer() else edge)})


def test_a_huge_malformed_value_is_not_echoed_in_full() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"TOKENBROKER_CONCURRENCY": "x" * 100_000})
    assert len(caught.value.message) < 200


def test_the_readme_documents_every_bound() -> None:
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    for bound in BOUNDS:
        assert f"| `{bound.variable}` | {bound.range_text} |" in readme, bound.variable
