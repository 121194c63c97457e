"""The issuer policy: strict loading, deny by default, scope and lifetime bounds, relay paths."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from tokenbroker.entrypoints.cli import main
from tokenbroker.issue.policy import (
    DENIED,
    RELAY_DENIED,
    CredentialField,
    Inject,
    IssuePolicy,
)
from tokenbroker.issue.policy_file import load_policy, parse_policy_text
from tokenbroker.kernel.errors import BadRequest, ConfigError, PolicyDenied

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "policy.toml"

CRM = "crm-sync@acme-prod.iam.gserviceaccount.com"
BILLING = "billing@acme-prod.iam.gserviceaccount.com"

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


@pytest.fixture(scope="module")
def policy() -> IssuePolicy:
    return parse_policy_text(BASE)


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


def test_base_fixture_loads_and_normalises(policy: IssuePolicy) -> None:
    sige = policy.relay(CRM, "sige", "GET", "Pedidos")
    assert sige.base_url == "https://api.sigecloud.com.br/request/"  # trailing slash added
    assert sige.credential_headers == {"authorization-token"}
    assert policy.summary().to_json() == {
        "grants": 4,
        "relays": 2,
        "callers": 6,
        "connections": 5,
    }


def test_an_empty_policy_is_valid_and_denies_everything() -> None:
    for empty in (parse_policy_text("version = 1\n"), IssuePolicy.deny_all()):
        with pytest.raises(PolicyDenied, match=DENIED):
            empty.authorize(CRM, "zoho-eu", None, None)
        with pytest.raises(PolicyDenied, match=RELAY_DENIED):
            empty.relay(CRM, "omie", "POST", "x")


def test_callers_are_lower_cased() -> None:
    text = BASE.replace("crm-sync@acme-prod", "CRM-Sync@ACME-prod")
    loaded = parse_policy_text(text)
    assert loaded.authorize(CRM.upper(), "zoho-eu", None, None).connection_id == "zoho-eu"


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


def test_policy_is_immutable(policy: IssuePolicy) -> None:
    with pytest.raises(AttributeError):
        policy.grants = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.allowances(CRM)["zoho-eu"] = policy.allowances(CRM)["zoho-eu"]  # type: ignore[index]
    route = policy.relays[0]
    with pytest.raises(TypeError):
        route.body_fields["x"] = CredentialField.CLIENT_ID  # type: ignore[index]


# --- token grants -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "connection"),
    [
        ("stranger@evil.com", "zoho-eu"),  # nobody named
        (CRM, "zoho-in"),  # granted other connections, not this one
        (CRM, "no-such-connection"),  # unknown connection
        ("crm-sync@acme-prod.iam.gserviceaccount.com.evil.com", "zoho-eu"),  # suffix trick
        ("x@evil.acme-reports.iam.gserviceaccount.com", "google-reports"),  # subdomain
        ("not-an-email", "zoho-eu"),
        ("a@b@acme-reports.iam.gserviceaccount.com", "google-reports"),  # two @: no wildcard
        ("", "zoho-eu"),
    ],
)
def test_deny_by_default_with_one_message(
    policy: IssuePolicy, caller: str, connection: str
) -> None:
    with pytest.raises(PolicyDenied) as caught:
        policy.authorize(caller, connection, None, None)
    assert caught.value.message == DENIED
    assert caught.value.code == "access_denied"
    assert caught.value.http_status == 403


def test_unknown_and_ungranted_connections_are_indistinguishable(policy: IssuePolicy) -> None:
    with pytest.raises(PolicyDenied) as unknown:
        policy.authorize(CRM, "does-not-exist", ["ZohoCRM.modules.READ"], 60)
    with pytest.raises(PolicyDenied) as ungranted:
        policy.authorize(CRM, "google-reports", ["ZohoCRM.modules.READ"], 60)
    assert str(unknown.value) == str(ungranted.value) == DENIED
    assert repr(unknown.value) == repr(ungranted.value)


def test_exact_caller_is_granted(policy: IssuePolicy) -> None:
    grant = policy.authorize(CRM, "zoho-us", ["ZohoCRM.modules.READ"], None)
    assert grant.connection_id == "zoho-us"
    assert grant.scopes == ("ZohoCRM.modules.READ",)
    assert grant.full_scope_allowed is False
    assert grant.max_lifetime_seconds == 900


def test_domain_wildcard_covers_the_domain_only(policy: IssuePolicy) -> None:
    grant = policy.authorize(
        "anyone@acme-reports.iam.gserviceaccount.com", "google-reports", None, 0
    )
    assert grant.scopes == ("sheets.readonly",)
    assert grant.max_lifetime_seconds == 600
    with pytest.raises(PolicyDenied, match=DENIED):
        policy.authorize("anyone@acme-reports.iam.gserviceaccount.com", "zoho-eu", None, None)


def test_exact_and_wildcard_grants_add_up(policy: IssuePolicy) -> None:
    exporter = "exporter@acme-reports.iam.gserviceaccount.com"
    grant = policy.authorize(exporter, "google-reports", None, None)
    assert grant.scopes == ("sheets", "sheets.readonly")  # both grants' scopes
    assert grant.max_lifetime_seconds == 1800  # the longer lifetime
    assert policy.authorize(exporter, "google-reports", ["sheets.readonly"], 1800).scopes == (
        "sheets.readonly",
    )
    # Another member of the domain gets only the wildcard grant.
    other = policy.authorize(
        "other@acme-reports.iam.gserviceaccount.com", "google-reports", None, None
    )
    assert other.scopes == ("sheets.readonly",)


def test_requested_scopes_must_be_a_subset(policy: IssuePolicy) -> None:
    grant = policy.authorize(
        CRM,
        "zoho-eu",
        ["ZohoCRM.settings.READ", "ZohoCRM.modules.READ", "ZohoCRM.modules.READ"],
        None,
    )
    assert grant.scopes == ("ZohoCRM.modules.READ", "ZohoCRM.settings.READ")  # sorted, unique
    with pytest.raises(PolicyDenied) as caught:
        policy.authorize(CRM, "zoho-eu", ["ZohoCRM.modules.READ", "ZohoCRM.modules.ALL"], None)
    assert caught.value.message == "scope not allowed: ZohoCRM.modules.ALL"


def test_default_scopes_without_star_are_the_granted_list(policy: IssuePolicy) -> None:
    defaults: tuple[list[str] | None, ...] = (None, [])
    for requested in defaults:
        grant = policy.authorize(CRM, "zoho-eu", requested, None)
        assert grant.scopes == ("ZohoCRM.modules.READ", "ZohoCRM.settings.READ")
        assert grant.full_scope_allowed is False


def test_star_allows_any_scope_and_the_full_scope(policy: IssuePolicy) -> None:
    oncall = "oncall@acme-prod.iam.gserviceaccount.com"
    full = policy.authorize(oncall, "zoho-eu", None, None)
    assert full.scopes is None  # the connection's full scope
    assert full.full_scope_allowed is True
    assert full.max_lifetime_seconds == 3600  # the default
    assert policy.authorize(oncall, "zoho-eu", [], None).scopes is None
    narrowed = policy.authorize(oncall, "zoho-eu", ["Anything.At.All"], None)
    assert narrowed.scopes == ("Anything.At.All",)
    assert narrowed.full_scope_allowed is True
    with pytest.raises(PolicyDenied, match=DENIED):
        policy.authorize(oncall, "zoho-us", None, None)  # "*" is per connection


@pytest.mark.parametrize("scope", ["*", "a b", "", 'x"y', "x\\y"])
def test_malformed_requested_scopes_are_bad_requests(policy: IssuePolicy, scope: str) -> None:
    with pytest.raises(BadRequest):
        policy.authorize("oncall@acme-prod.iam.gserviceaccount.com", "zoho-eu", [scope], None)


def test_a_scope_string_is_not_a_scope_list(policy: IssuePolicy) -> None:
    with pytest.raises(BadRequest, match="not one string"):
        policy.authorize(CRM, "zoho-eu", "ZohoCRM.modules.READ", None)


def test_min_ttl_is_bounded_by_the_lifetime(policy: IssuePolicy) -> None:
    assert policy.authorize(CRM, "zoho-eu", None, 900).max_lifetime_seconds == 900
    with pytest.raises(PolicyDenied, match=r"min_ttl_seconds 901 .*\(900s\)"):
        policy.authorize(CRM, "zoho-eu", None, 901)
    with pytest.raises(BadRequest):
        policy.authorize(CRM, "zoho-eu", None, -1)
    with pytest.raises(BadRequest):
        policy.authorize(CRM, "zoho-eu", None, True)


def test_an_unknown_connection_is_denied_before_scope_or_ttl_checks(policy: IssuePolicy) -> None:
    """Even a request that would fail later fails first with the same refusal."""
    with pytest.raises(PolicyDenied) as caught:
        policy.authorize(CRM, "nope", ["*"], 10_000)
    assert caught.value.message == DENIED


# --- relays -------------------------------------------------------------------------------------


def test_relay_by_name_or_connection(policy: IssuePolicy) -> None:
    by_name = policy.relay(BILLING, "omie-clients", "POST", "geral/clientes/")
    by_connection = policy.relay(BILLING, "omie", "POST", "/geral/clientes/")
    assert by_name is by_connection


@pytest.mark.parametrize(
    ("caller", "name"),
    [
        ("stranger@evil.com", "omie-clients"),  # not listed
        (CRM, "omie-clients"),  # listed for another relay only
        (BILLING, "no-such-relay"),  # unknown
        (BILLING, "no-such-connection"),
        ("billing@acme-prod.iam.gserviceaccount.com.evil.com", "omie-clients"),
    ],
)
def test_relay_deny_by_default_with_one_message(
    policy: IssuePolicy, caller: str, name: str
) -> None:
    with pytest.raises(PolicyDenied) as caught:
        policy.relay(caller, name, "POST", "geral/clientes/")
    assert caught.value.message == RELAY_DENIED


def test_relay_domain_wildcard(policy: IssuePolicy) -> None:
    assert policy.relay(BILLING, "sige", "GET", "Pedidos/123").name == "sige"
    assert policy.relay(CRM, "sige-conn", "POST", "Estoque/").name == "sige"


@pytest.mark.parametrize("method", ["GET", "DELETE", "post", "TRACE", ""])
def test_relay_methods_are_checked_exactly(policy: IssuePolicy, method: str) -> None:
    with pytest.raises(PolicyDenied, match="method not allowed"):
        policy.relay(BILLING, "omie-clients", method, "geral/clientes/")


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("geral/clientes/", True),
        ("/geral/clientes/", True),
        ("geral/clientes/ListarClientes", True),
        ("geral/clientes/a%20b", True),
        ("geral/clientes", False),  # the prefix ends with '/': the bare path is outside it
        ("geral/clientesX/", False),
        ("geral/produtos/", False),
        ("geral/", False),
        ("", False),
        ("/", False),
    ],
)
def test_relay_path_prefixes(policy: IssuePolicy, path: str, allowed: bool) -> None:
    if allowed:
        assert policy.relay(BILLING, "omie-clients", "POST", path).name == "omie-clients"
    else:
        with pytest.raises(PolicyDenied, match="path not allowed"):
            policy.relay(BILLING, "omie-clients", "POST", path)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("Pedidos", True),
        ("Pedidos/", True),
        ("Pedidos/42", True),
        ("PedidosX", False),  # segment boundary: 'Pedidos' does not cover 'PedidosX'
        ("Estoque", False),
        ("Estoque/1", True),
    ],
)
def test_prefix_matching_is_on_segment_boundaries(
    policy: IssuePolicy, path: str, allowed: bool
) -> None:
    route = policy.relays[1]
    if allowed:
        assert route.check("GET", path)
    else:
        with pytest.raises(PolicyDenied):
            route.check("GET", path)


TRAVERSALS = [
    "geral/clientes/../../admin",
    "geral/clientes/..",
    "geral/clientes/./x",
    "../geral/clientes/",
    "geral/clientes/%2e%2e/%2e%2e/admin",
    "geral/clientes/%2E%2E/x",
    "geral/clientes/.%2e/x",
    "geral/clientes/%2e",
    "geral/clientes/%252e%252e/x",  # double encoding
    "geral/clientes/a%2f..%2f..%2fadmin",  # encoded slash
    "geral/clientes/a%2Fb",
    "geral/clientes/a%5c..%5cadmin",  # encoded backslash
    "geral/clientes/..\\..\\admin",
    "geral\\clientes\\x",
    "//evil.com/x",
    "///evil.com/x",
    "//evil.com/geral/clientes/",
    "http://evil/",
    "https://evil.com/geral/clientes/",
    "http:evil/geral/clientes/",
    "geral/clientes//x",
    "geral/clientes/x?y=1",
    "geral/clientes/x#frag",
    "geral/clientes/a b",
    "geral/clientes/a\tb",
    "geral/clientes/a%00b",
    "geral/clientes/a%0d%0aHost:%20evil",
    "geral/clientes/é",
    "geral/clientes/%zz",
    "geral/clientes/%",
    "geral/clientes/%ff",  # not UTF-8
    "geral/clientes/" + "a" * 3000,
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_tricks_are_denied(policy: IssuePolicy, path: str) -> None:
    with pytest.raises(PolicyDenied, match="path not allowed"):
        policy.relay(BILLING, "omie-clients", "POST", path)
    with pytest.raises(PolicyDenied):
        policy.relays[0].url_for(path)


@pytest.mark.parametrize(
    ("path", "query", "url"),
    [
        ("geral/clientes/", None, "https://app.omie.com.br/api/v1/geral/clientes/"),
        ("/geral/clientes/x", "", "https://app.omie.com.br/api/v1/geral/clientes/x"),
        ("geral/clientes/a%20b", "q=1&r=a%20b", "https://app.omie.com.br/api/v1/geral/clientes/a%20b?q=1&r=a%20b"),
        ("geral/clientes/a%3Fb", None, "https://app.omie.com.br/api/v1/geral/clientes/a%3Fb"),
        ("geral/clientes/{x}", "a=<b>", "https://app.omie.com.br/api/v1/geral/clientes/%7Bx%7D?a=%3Cb%3E"),
        ("geral/clientes/@evil.com", None, "https://app.omie.com.br/api/v1/geral/clientes/@evil.com"),
    ],
)  # fmt: skip
def test_url_for_joins_under_the_base(
    policy: IssuePolicy, path: str, query: str | None, url: str
) -> None:
    route = policy.relays[0]
    assert route.url_for(path, query) == url
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc) == ("https", "app.omie.com.br")


@pytest.mark.parametrize("query", ["a=1#frag", "a=%zz", "a=b c", "a=\\"])
def test_url_for_refuses_bad_queries(policy: IssuePolicy, query: str) -> None:
    with pytest.raises(PolicyDenied):
        policy.relays[0].url_for("geral/clientes/", query)


def test_url_for_never_changes_host(policy: IssuePolicy) -> None:
    """Whatever a caller sends, the URL either stays on the base host and path or is refused."""
    route = policy.relays[0]
    pieces = ["geral", "clientes", "..", ".", "", "%2e", "%2f", "evil.com", "@evil.com", ":443",
              "http:", "\\", "%5c", "a", "%40", "?", "#", "%3F"]  # fmt: skip
    tried = 0
    for first in pieces:
        for second in pieces:
            for third in pieces:
                path = f"geral/clientes/{first}/{second}{third}"
                for candidate in (path, first + second + third, f"/{first}/{second}/{third}"):
                    tried += 1
                    try:
                        url = route.url_for(candidate)
                    except PolicyDenied:
                        continue
                    parts = urlsplit(url)
                    assert parts.netloc == "app.omie.com.br", url
                    assert parts.path.startswith("/api/v1/geral/clientes/"), url
                    assert not parts.query and not parts.fragment, url
    assert tried == 3 * len(pieces) ** 3


def test_header_injection_fields(policy: IssuePolicy) -> None:
    sige = policy.relays[1]
    assert (sige.connection, sige.inject) == ("sige-conn", Inject.HEADER)
    assert (sige.header, sige.header_value) == (
        "Authorization-Token",
        CredentialField.CLIENT_SECRET,
    )
    default = parse_policy_text(_replace('header_value = "client_secret"\n', ""))
    assert default.relays[1].header_value is CredentialField.ACCESS_TOKEN
    omie = policy.relays[0]
    assert (omie.header, omie.header_value) == (None, None)


def test_relays_for_and_reserved_headers(policy: IssuePolicy) -> None:
    assert [r.name for r in policy.relays_for(BILLING)] == ["omie-clients", "sige"]
    assert [r.name for r in policy.relays_for(CRM)] == ["sige"]
    assert policy.relays_for("stranger@evil.com") == ()
    bearer = load_policy(EXAMPLE).relay(BILLING, "zoho-books-invoices", "GET", "invoices/1")
    assert bearer.credential_headers == {"authorization"}


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
    assert result.output.strip() == "ok: 4 grants, 2 relays, 6 callers"


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
