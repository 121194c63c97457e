"""Reading the issuer policy file: strict validation naming field and line, normalisation into
the rule values, loading errors, and the ``tokenbroker policy`` commands that read it."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tokenbroker.entrypoints.cli import main
from tokenbroker.issue import policy as rules_module
from tokenbroker.issue.policy import (
    DENIED,
    RELAY_DENIED,
    CredentialField,
    Inject,
)
from tokenbroker.issue.policy_file import load_policy, parse_policy, parse_policy_text
from tokenbroker.kernel.errors import ConfigError, PolicyDenied

from .test_policy import BILLING, CRM, RULES

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "policy.toml"

BASE = """\
version = 1

[[grants]]
callers = ["crm-sync@acme-prod.iam.gserviceaccount.com"]
connections = ["zoho-eu", "zoho-us"]
scopes = ["ZohoCRM.modules.READ", "ZohoCRM.settings.READ"]
max_lifetime_seconds = 900

[[grants]]
callers = ["*@acme-reports.iam.gserviceaccount.com"]
connections = ["google-reports"]
scopes = ["sheets.readonly"]
max_lifetime_seconds = 600

[[grants]]
callers = ["exporter@acme-reports.iam.gserviceaccount.com"]
connections = ["google-reports"]
scopes = ["sheets"]
max_lifetime_seconds = 1800

[[grants]]
callers = ["oncall@acme-prod.iam.gserviceaccount.com"]
connections = ["zoho-eu"]
scopes = ["*"]

[[relays]]
name = "omie-clients"
callers = ["billing@acme-prod.iam.gserviceaccount.com"]
connection = "omie"
base_url = "https://app.omie.com.br/api/v1/"
methods = ["POST"]
path_prefixes = ["geral/clientes/"]
inject = "body"
body_fields = { app_key = "client_id", app_secret = "client_secret" }

[[relays]]
name = "sige"
callers = ["*@acme-prod.iam.gserviceaccount.com"]
connection = "sige-conn"
base_url = "https://api.sigecloud.com.br/request"
methods = ["GET", "POST"]
path_prefixes = ["Pedidos", "Estoque/"]
inject = "header"
header = "Authorization-Token"
header_value = "client_secret"
"""


# --- loading ----------------------------------------------------------------------------------


def test_the_example_file_loads() -> None:
    loaded = load_policy(EXAMPLE)
    summary = loaded.summary()
    assert (summary.grants, summary.relays) == (4, 3)
    assert loaded.source == str(EXAMPLE)
    omie = loaded.relay(BILLING, "omie-clients", "POST", "geral/clientes/")
    assert omie.inject is Inject.BODY
    assert dict(omie.body_fields) == {
        "app_key": CredentialField.CLIENT_ID,
        "app_secret": CredentialField.CLIENT_SECRET,
    }
    bearer = loaded.relay(BILLING, "zoho-books-invoices", "GET", "invoices/1")
    assert (bearer.inject, bearer.max_body_bytes) == (Inject.BEARER, 0)


def test_the_base_file_reads_into_the_rule_values() -> None:
    """Every normalisation at once: lower-case callers, a trailing ``/`` on ``base_url``,
    enums, and defaults (lifetime 3600, body 1 MiB, timeout 30 s)."""
    loaded = parse_policy_text(BASE)
    assert loaded.grants == RULES.grants
    assert loaded.relays == RULES.relays
    assert loaded.source == "policy.toml"
    assert loaded.relays[1].base_url == "https://api.sigecloud.com.br/request/"
    assert (loaded.grants[3].max_lifetime_seconds, loaded.relays[0].timeout_seconds) == (3600, 30)


def test_parse_policy_reads_parsed_data_and_names_fields_without_lines() -> None:
    data: dict[str, object] = {
        "version": 1,
        "grants": [{"callers": [CRM], "connections": ["zoho-eu"], "scopes": ["x"]}],
    }
    loaded = parse_policy(data, source="inline")
    assert (loaded.source, loaded.authorize(CRM, "zoho-eu", None, None).scopes) == (
        "inline",
        ("x",),
    )
    data["grants"] = [{"callers": [CRM], "connections": ["zoho-eu"], "scopes": ["x"], "y": 1}]
    with pytest.raises(ConfigError) as caught:
        parse_policy(data)
    assert caught.value.message == "unknown field(s): grants[0].y"


def test_an_empty_file_is_valid_and_denies_everything() -> None:
    empty = parse_policy_text("version = 1\n")
    assert (empty.grants, empty.relays) == ((), ())
    with pytest.raises(PolicyDenied, match=DENIED):
        empty.authorize(CRM, "zoho-eu", None, None)
    with pytest.raises(PolicyDenied, match=RELAY_DENIED):
        empty.relay(CRM, "omie", "POST", "x")


def test_callers_are_lower_cased() -> None:
    text = BASE.replace("crm-sync@acme-prod", "CRM-Sync@ACME-prod")
    loaded = parse_policy_text(text)
    assert loaded.grants[0].callers == (CRM,)
    assert loaded.authorize(CRM.upper(), "zoho-eu", None, None).connection_id == "zoho-eu"


def test_header_value_defaults_to_the_access_token() -> None:
    default = parse_policy_text(_replace('header_value = "client_secret"\n', ""))
    assert default.relays[1].header_value is CredentialField.ACCESS_TOKEN
    assert default.relays[0].header_value is None  # not a header relay


def _replace(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


GRANT0_LIFETIME = "max_lifetime_seconds = 900"
OMIE_METHODS = 'methods = ["POST"]'
OMIE_BASE = 'base_url = "https://app.omie.com.br/api/v1/"'
OMIE_PREFIX = 'path_prefixes = ["geral/clientes/"]'
OMIE_INJECT = (
    'inject = "body"\nbody_fields = { app_key = "client_id", app_secret = "client_secret" }'
)
CRM_CALLERS = 'callers = ["crm-sync@acme-prod.iam.gserviceaccount.com"]'
CRM_SCOPES = 'scopes = ["ZohoCRM.modules.READ", "ZohoCRM.settings.READ"]'
SIGE_HEADER = 'header = "Authorization-Token"'

INVALID = [
    # (name, text, the field path the error must name, the line it must name or None)
    ("version missing", BASE.replace("version = 1\n", ""), "version: required", None),
    ("version 2", _replace("version = 1", "version = 2"), "version: unsupported", 1),
    (
        "unknown top",
        _replace("version = 1", "version = 1\nrelay = []"),
        "unknown field(s): relay",
        2,
    ),
    (
        "grants not tables",
        'version = 1\ngrants = "all"\n',
        "grants: expected an array of tables",
        2,
    ),
    (
        "lifetime high",
        _replace(GRANT0_LIFETIME, "max_lifetime_seconds = 7200"),
        "grants[0].max_lifetime_seconds: must be at most 3600",
        7,
    ),
    (
        "lifetime low",
        _replace(GRANT0_LIFETIME, "max_lifetime_seconds = 5"),
        "grants[0].max_lifetime_seconds: must be at least 60",
        7,
    ),
    (
        "lifetime type",
        _replace(GRANT0_LIFETIME, 'max_lifetime_seconds = "900"'),
        "grants[0].max_lifetime_seconds: expected an integer",
        7,
    ),
    (
        "unknown grant field",
        _replace(GRANT0_LIFETIME, f"{GRANT0_LIFETIME}\nscope = 'x'"),
        "unknown field(s): grants[0].scope",
        8,
    ),
    ("callers missing", _replace(CRM_CALLERS, ""), "grants[0].callers: required", 3),
    ("callers empty", _replace(CRM_CALLERS, "callers = []"), "grants[0].callers: list at least", 4),
    (
        "callers not list",
        _replace(CRM_CALLERS, 'callers = "a@b.com"'),
        "grants[0].callers: expected",
        4,
    ),
    (
        "caller not email",
        _replace(CRM_CALLERS, 'callers = ["crm-sync"]'),
        "grants[0].callers[0]: 'crm-sync' is not an email",
        4,
    ),
    (
        "caller two @",
        _replace(CRM_CALLERS, 'callers = ["a@b@acme.com"]'),
        "grants[0].callers[0]",
        4,
    ),
    (
        "partial wildcard",
        _replace(CRM_CALLERS, 'callers = ["crm-*@acme.com"]'),
        "grants[0].callers[0]: 'crm-*@acme.com': the only wildcard",
        4,
    ),
    ("bare wildcard", _replace(CRM_CALLERS, 'callers = ["*"]'), "grants[0].callers[0]", 4),
    (
        "wildcard domain",
        _replace(CRM_CALLERS, 'callers = ["*@*.acme.com"]'),
        "grants[0].callers[0]",
        4,
    ),
    (
        "duplicate caller",
        _replace(CRM_CALLERS, 'callers = ["a@b.com", "A@B.com"]'),
        "grants[0].callers[1]: 'A@B.com' is already listed at grants[0].callers[0]",
        4,
    ),
    (
        "connection id",
        _replace('connections = ["zoho-eu", "zoho-us"]', 'connections = ["Zoho EU"]'),
        "grants[0].connections[0]: 'Zoho EU' is not a valid id",
        5,
    ),
    (
        "duplicate connection",
        _replace('"zoho-eu", "zoho-us"', '"zoho-eu", "zoho-eu"'),
        "grants[0].connections[1]: 'zoho-eu' is already listed",
        5,
    ),
    (
        "scope with space",
        _replace(CRM_SCOPES, 'scopes = ["a b"]'),
        "grants[0].scopes[0]: 'a b' is not a scope",
        6,
    ),
    (
        "scope empty",
        _replace(CRM_SCOPES, 'scopes = [""]'),
        "grants[0].scopes[0]: expected a non-empty",
        6,
    ),
    ("scope not string", _replace(CRM_SCOPES, "scopes = [1]"), "grants[0].scopes[0]", 6),
    ("scopes empty", _replace(CRM_SCOPES, "scopes = []"), "grants[0].scopes: list at least one", 6),
    (
        "star and more",
        _replace(CRM_SCOPES, 'scopes = ["*", "a"]'),
        "grants[0].scopes: '*' already",
        6,
    ),
    ("grant not table", "version = 1\ngrants = [1]\n", "grants[0]: expected a table", None),
    (
        "relay name",
        _replace('name = "omie-clients"', 'name = "Omie Clients"'),
        "relays[0].name:",
        27,
    ),
    ("relay name missing", _replace('name = "omie-clients"\n', ""), "relays[0].name: required", 26),
    (
        "duplicate relay",
        _replace('name = "sige"', 'name = "omie-clients"'),
        "relays[1].name: 'omie-clients' is already the name of relays[0]",
        37,
    ),
    (
        "relay name is a connection",
        _replace('name = "sige"', 'name = "omie"'),
        "relays[1].name: 'omie' is the connection of relay 'omie-clients'",
        37,
    ),
    (
        "relay connection",
        _replace('connection = "omie"', 'connection = "omie!"'),
        "relays[0].connection:",
        29,
    ),
    (
        "unknown relay field",
        _replace(OMIE_METHODS, f"{OMIE_METHODS}\nmethod = 'GET'"),
        "unknown field(s): relays[0].method",
        32,
    ),
    (
        "method",
        _replace(OMIE_METHODS, 'methods = ["TRACE"]'),
        "relays[0].methods[0]: 'TRACE' is not one of",
        31,
    ),
    ("method case", _replace(OMIE_METHODS, 'methods = ["post"]'), "relays[0].methods[0]", 31),
    (
        "methods empty",
        _replace(OMIE_METHODS, "methods = []"),
        "relays[0].methods: list at least",
        31,
    ),
    (
        "body needs a body",
        _replace(OMIE_METHODS, 'methods = ["POST", "GET"]'),
        'relays[0].methods: inject = "body" needs a request body; GET',
        31,
    ),
    (
        "http",
        _replace(OMIE_BASE, 'base_url = "http://app.omie.com.br/api/v1/"'),
        "relays[0].base_url: 'http://app.omie.com.br/api/v1/': must be https",
        30,
    ),
    ("ftp", _replace(OMIE_BASE, 'base_url = "ftp://app.omie.com.br/"'), "relays[0].base_url", 30),
    (
        "userinfo",
        _replace(OMIE_BASE, 'base_url = "https://u:p@app.omie.com.br/"'),
        "relays[0].base_url: must not contain user information",
        30,
    ),
    (
        "query",
        _replace(OMIE_BASE, 'base_url = "https://app.omie.com.br/?x=1"'),
        "relays[0].base_url: must not have a query",
        30,
    ),
    (
        "fragment",
        _replace(OMIE_BASE, 'base_url = "https://app.omie.com.br/#x"'),
        "relays[0].base_url",
        30,
    ),
    ("no host", _replace(OMIE_BASE, 'base_url = "https:///api/"'), "relays[0].base_url", 30),
    (
        "bad port",
        _replace(OMIE_BASE, 'base_url = "https://app.omie.com.br:99999/"'),
        "relays[0].base_url",
        30,
    ),
    (
        "base dots",
        _replace(OMIE_BASE, 'base_url = "https://app.omie.com.br/a/../b/"'),
        "relays[0].base_url",
        30,
    ),
    (
        "base space",
        _replace(OMIE_BASE, 'base_url = "https://app.omie.com.br/a b/"'),
        "relays[0].base_url",
        30,
    ),
    (
        "prefix leading slash",
        _replace(OMIE_PREFIX, 'path_prefixes = ["/geral/"]'),
        "relays[0].path_prefixes[0]: '/geral/': write the path relative",
        32,
    ),
    (
        "prefix dots",
        _replace(OMIE_PREFIX, 'path_prefixes = ["geral/../admin/"]'),
        "relays[0].path_prefixes[0]: 'geral/../admin/': dot segments",
        32,
    ),
    (
        "prefix double slash",
        _replace(OMIE_PREFIX, 'path_prefixes = ["geral//x"]'),
        "relays[0].path_prefixes[0]: 'geral//x': empty segments",
        32,
    ),
    (
        "prefix encoded",
        _replace(OMIE_PREFIX, 'path_prefixes = ["geral%2fx"]'),
        "relays[0].path_prefixes[0]",
        32,
    ),
    (
        "prefix backslash",
        _replace(OMIE_PREFIX, 'path_prefixes = ["geral\\\\x"]'),
        "relays[0].path_prefixes[0]",
        32,
    ),
    (
        "prefix query",
        _replace(OMIE_PREFIX, 'path_prefixes = ["geral?x"]'),
        "relays[0].path_prefixes[0]",
        32,
    ),
    (
        "prefix scheme",
        _replace(OMIE_PREFIX, 'path_prefixes = ["http://evil/"]'),
        "relays[0].path_prefixes[0]",
        32,
    ),
    ("prefixes missing", _replace(f"{OMIE_PREFIX}\n", ""), "relays[0].path_prefixes: required", 26),
    (
        "inject",
        _replace('inject = "body"', 'inject = "query"'),
        "relays[0].inject: 'query' is not one of",
        33,
    ),
    (
        "body fields missing",
        _replace(OMIE_INJECT, 'inject = "body"'),
        "relays[0].body_fields: required when inject = 'body'",
        26,
    ),
    (
        "body fields with bearer",
        _replace('inject = "body"', 'inject = "bearer"'),
        "relays[0].body_fields: not used when inject = 'bearer'",
        34,
    ),
    (
        "body attribute",
        _replace('app_key = "client_id"', 'app_key = "refresh_token"'),
        "relays[0].body_fields.app_key: 'refresh_token' is not one of",
        34,
    ),
    (
        "body field name",
        _replace("app_key = ", '"app key" = '),
        "relays[0].body_fields.app key",
        34,
    ),
    (
        "header missing",
        _replace(f"{SIGE_HEADER}\n", ""),
        "relays[1].header: required field is missing",
        36,
    ),
    (
        "header reserved",
        _replace(SIGE_HEADER, 'header = "Host"'),
        "relays[1].header: 'Host' cannot carry a credential",
        44,
    ),
    (
        "header name",
        _replace(SIGE_HEADER, 'header = "Bad Header"'),
        "relays[1].header: 'Bad Header' is not a valid header name",
        44,
    ),
    (
        "header private key",
        _replace('header_value = "client_secret"', 'header_value = "private_key"'),
        "relays[1].header_value: 'private_key' is not one of",
        45,
    ),
    (
        "header with body inject",
        _replace('inject = "body"', 'inject = "body"\nheader = "X-Key"'),
        "relays[0].header: not used when inject = 'body'",
        34,
    ),
    (
        "header_value with body inject",
        _replace('inject = "body"', 'inject = "body"\nheader_value = "client_id"'),
        "relays[0].header_value: not used when inject = 'body'",
        34,
    ),
    (
        "max body",
        _replace(OMIE_METHODS, f"{OMIE_METHODS}\nmax_body_bytes = 1073741824"),
        "relays[0].max_body_bytes: must be at most",
        32,
    ),
    (
        "timeout",
        _replace(OMIE_METHODS, f"{OMIE_METHODS}\ntimeout_seconds = 0"),
        "relays[0].timeout_seconds: must be at least 1",
        32,
    ),
    (
        "relay callers",
        _replace('callers = ["billing@', 'callers = ["billing@@'),
        "relays[0].callers[0]",
        28,
    ),
]


@pytest.mark.parametrize(
    ("text", "named", "line"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_every_validation_error_names_the_field(text: str, named: str, line: int | None) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy_text(text, source="policy.toml")
    message = caught.value.message
    assert message.startswith("policy.toml: "), message
    assert named in message, message
    if line is not None:
        assert message.endswith(f"(line {line})"), message


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('version = 1\n[[grants]]\ncallers = ["a@b.com",,]\n', 3),
        ("version = 1\n\n[[grants]\n", 3),
        ("version = 1\nversion = 1\n", 2),
        ("version = 1\n[[grants]]\nscopes = [a]\n", 3),
    ],
)
def test_toml_syntax_errors_name_the_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy_text(text, source="p.toml")
    assert caught.value.message.startswith("p.toml: invalid TOML: ")
    assert re.search(rf"\(at line {line}, column \d+\)", caught.value.message)


def test_load_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy file .*nope\.toml: No such file"):
        load_policy(tmp_path / "nope.toml")


def test_load_names_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("version = 1\n# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"policy file .*latin1\.toml: not UTF-8 text"):
        load_policy(path)


def test_the_rules_module_does_not_import_the_file_reader() -> None:
    """The file reader depends on the rules, never the reverse (no cycle), and the rules
    read no files."""
    tree = ast.parse(Path(rules_module.__file__).read_text(encoding="utf-8"))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported += [f"{node.module or ''}.{alias.name}" for alias in node.names]
    assert any(name.startswith("tokenbroker.kernel.") for name in imported), imported
    assert not [n for n in imported if "policy_file" in n or n.split(".")[0] == "tomllib"]


def test_http_base_url_only_for_loopback() -> None:
    local = _replace(
        'base_url = "https://app.omie.com.br/api/v1/"', 'base_url = "http://127.0.0.1:8099/api"'
    )
    route = parse_policy_text(local).relays[0]
    assert route.base_url == "http://127.0.0.1:8099/api/"
    assert route.url_for("geral/clientes/x") == "http://127.0.0.1:8099/api/geral/clientes/x"


# --- the command line -----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_cli_check_ok(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["policy", "check", str(_write(tmp_path, BASE))])
    assert result.exit_code == 0, result.output
    first, *notes = result.output.strip().splitlines()
    assert first == "ok: 4 grants, 2 relays, 6 callers"
    # Grants shorter than an hour say what their lifetime cannot promise.
    assert len(notes) == 3
    assert all(n.startswith("note: grants[") and "stay valid" in n for n in notes)


def test_cli_check_example_json() -> None:
    result = CliRunner().invoke(main, ["policy", "check", "--json", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True
    assert (data["grants"], data["relays"]) == (4, 3)
    global_flag = CliRunner().invoke(main, ["--json", "policy", "check", str(EXAMPLE)])
    assert json.loads(global_flag.output) == data


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (_replace(GRANT0_LIFETIME, "max_lifetime_seconds = 7200"),
         "grants[0].max_lifetime_seconds: must be at most 3600 (line 7)"),
        ("version = 1\n[[grants]\n", "invalid TOML: "),
        ("version = 1\nbogus = true\n", "unknown field(s): bogus (line 2)"),
    ],
)  # fmt: skip
def test_cli_check_errors_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    result = CliRunner().invoke(main, ["policy", "check", str(path)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {path}: ")
    assert expected in result.output


def test_cli_check_missing_file_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["policy", "check", str(tmp_path / "missing.toml")])
    assert result.exit_code == 2
    assert "error: policy file" in result.output


def test_cli_explain(tmp_path: Path) -> None:
    path = str(_write(tmp_path, BASE))
    runner = CliRunner()
    result = runner.invoke(main, ["policy", "explain", path, "--caller", BILLING, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["connections"] == []
    assert [r["name"] for r in data["relays"]] == ["omie-clients", "sige"]

    exporter = "exporter@acme-reports.iam.gserviceaccount.com"
    result = runner.invoke(main, ["policy", "explain", path, "--caller", exporter])
    assert result.exit_code == 0, result.output
    assert "google-reports  sheets sheets.readonly  1800s" in result.output

    result = runner.invoke(
        main, ["policy", "explain", path, "--caller", CRM, "--connection", "zoho-us", "--json"]
    )
    assert [c["connection"] for c in json.loads(result.output)["connections"]] == ["zoho-us"]

    result = runner.invoke(main, ["policy", "explain", path, "--caller", "who@evil.com"])
    assert result.exit_code == 0
    assert "nothing is allowed (deny by default)" in result.output
