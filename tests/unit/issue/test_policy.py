"""The issuer policy's rules and decisions, on rule values (no file): deny by default, grants
that add up, scope and lifetime bounds, relay routes and paths, and generated policies whose
every decision must follow from the rules. Reading the file: ``test_policy_file.py``."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar
from urllib.parse import urlsplit

import pytest

from tokenbroker.issue.policy import (
    DENIED,
    FULL_SCOPE,
    RELAY_DENIED,
    CredentialField,
    GrantRule,
    HttpMethod,
    Inject,
    IssuePolicy,
    RelayRoute,
    TokenGrant,
)
from tokenbroker.kernel.errors import BadRequest, PolicyDenied

CRM = "crm-sync@acme-prod.iam.gserviceaccount.com"
BILLING = "billing@acme-prod.iam.gserviceaccount.com"

#: The rules ``test_policy_file.BASE`` reads into (that test checks they are equal).
RULES = IssuePolicy(
    grants=(
        GrantRule(
            callers=(CRM,),
            connections=("zoho-eu", "zoho-us"),
            scopes=("ZohoCRM.modules.READ", "ZohoCRM.settings.READ"),
            max_lifetime_seconds=900,
        ),
        GrantRule(
            callers=("*@acme-reports.iam.gserviceaccount.com",),
            connections=("google-reports",),
            scopes=("sheets.readonly",),
            max_lifetime_seconds=600,
        ),
        GrantRule(
            callers=("exporter@acme-reports.iam.gserviceaccount.com",),
            connections=("google-reports",),
            scopes=("sheets",),
            max_lifetime_seconds=1800,
        ),
        GrantRule(
            callers=("oncall@acme-prod.iam.gserviceaccount.com",),
            connections=("zoho-eu",),
            scopes=(FULL_SCOPE,),
        ),
    ),
    relays=(
        RelayRoute(
            name="omie-clients",
            connection="omie",
            callers=(BILLING,),
            base_url="https://app.omie.com.br/api/v1/",
            methods=frozenset({HttpMethod.POST}),
            path_prefixes=("geral/clientes/",),
            inject=Inject.BODY,
            body_fields={
                "app_key": CredentialField.CLIENT_ID,
                "app_secret": CredentialField.CLIENT_SECRET,
            },
        ),
        RelayRoute(
            name="sige",
            connection="sige-conn",
            callers=("*@acme-prod.iam.gserviceaccount.com",),
            base_url="https://api.sigecloud.com.br/request/",
            methods=frozenset({HttpMethod.GET, HttpMethod.POST}),
            path_prefixes=("Pedidos", "Estoque/"),
            inject=Inject.HEADER,
            header="Authorization-Token",
            header_value=CredentialField.CLIENT_SECRET,
        ),
    ),
)


@pytest.fixture(scope="module")
def policy() -> IssuePolicy:
    return RULES


# --- the rules --------------------------------------------------------------------------------


def test_summary_counts_distinct_callers_and_connections(policy: IssuePolicy) -> None:
    assert policy.summary().to_json() == {
        "grants": 4,
        "relays": 2,
        "callers": 6,
        "connections": 5,
    }


def test_deny_all_refuses_everything() -> None:
    empty = IssuePolicy.deny_all()
    with pytest.raises(PolicyDenied, match=DENIED):
        empty.authorize(CRM, "zoho-eu", None, None)
    with pytest.raises(PolicyDenied, match=RELAY_DENIED):
        empty.relay(CRM, "omie", "POST", "x")
    assert empty.explain(CRM).connections == empty.explain(CRM).relays == ()


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


def test_callers_are_compared_lower_cased(policy: IssuePolicy) -> None:
    upper = policy.authorize(CRM.upper(), "zoho-us", ["ZohoCRM.modules.READ"], None)
    assert upper == policy.authorize(CRM, "zoho-us", ["ZohoCRM.modules.READ"], None)
    assert policy.relay(BILLING.upper(), "omie-clients", "POST", "geral/clientes/").name == (
        "omie-clients"
    )


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
    # Each scope keeps its own grant's lifetime: both together only as long as the shorter.
    assert grant.max_lifetime_seconds == 600
    assert policy.authorize(exporter, "google-reports", ["sheets"], 1800).scopes == ("sheets",)
    assert policy.authorize(exporter, "google-reports", ["sheets.readonly"], None) == TokenGrant(
        "google-reports", ("sheets.readonly",), False, 600
    )
    with pytest.raises(PolicyDenied, match="600s"):
        policy.authorize(exporter, "google-reports", ["sheets.readonly"], 1800)
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
    omie = policy.relays[0]
    assert (omie.header, omie.header_value) == (None, None)


def test_relays_for_and_reserved_headers(policy: IssuePolicy) -> None:
    assert [r.name for r in policy.relays_for(BILLING)] == ["omie-clients", "sige"]
    assert [r.name for r in policy.relays_for(CRM)] == ["sige"]
    assert policy.relays_for("stranger@evil.com") == ()
    bearer = RelayRoute(
        name="books",
        connection="zoho-books",
        callers=(BILLING,),
        base_url="https://www.zohoapis.eu/books/v3/",
        methods=frozenset({HttpMethod.GET}),
        path_prefixes=("invoices",),
        inject=Inject.BEARER,
    )
    assert bearer.credential_headers == {"authorization"}
    assert policy.relays[0].credential_headers == frozenset()  # body injection sets no header
    assert policy.relays[1].credential_headers == {"authorization-token"}  # lower-cased


# --- explain ------------------------------------------------------------------------------------


def test_explain_lists_what_one_caller_may_do(policy: IssuePolicy) -> None:
    exporter = policy.explain("Exporter@ACME-reports.iam.gserviceaccount.com")
    assert exporter.caller == "exporter@acme-reports.iam.gserviceaccount.com"
    assert [
        (a.connection_id, sorted(a.scopes), a.max_lifetime_seconds) for a in exporter.connections
    ] == [("google-reports", ["sheets", "sheets.readonly"], 1800)]
    assert exporter.relays == ()

    crm = policy.explain(CRM)
    assert [a.connection_id for a in crm.connections] == ["zoho-eu", "zoho-us"]  # sorted
    assert [r.name for r in crm.relays] == ["sige"]  # the domain's relay
    assert [a.connection_id for a in policy.explain(CRM, "zoho-us").connections] == ["zoho-us"]
    assert policy.explain(CRM, "zoho-us").relays == ()


def test_explain_narrows_relays_by_name_or_connection(policy: IssuePolicy) -> None:
    by_name = policy.explain(BILLING, "omie-clients")
    by_connection = policy.explain(BILLING, "omie")
    assert by_name.relays == by_connection.relays == (policy.relays[0],)
    assert by_name.connections == ()


@pytest.mark.parametrize("caller", ["stranger@evil.com", "a@b@acme-prod.iam.gserviceaccount.com"])
def test_explain_for_a_caller_no_rule_names_is_empty(policy: IssuePolicy, caller: str) -> None:
    explained = policy.explain(caller)
    assert (explained.connections, explained.relays) == ((), ())


# --- generated policies ---------------------------------------------------------------------------
# Small random policies over a few callers, domains, connections and scopes, and many random
# requests against each. The oracle reads the rules one by one, as docs/policy.md states them
# ("every grant naming both the caller and the connection applies, and they add up"), not the
# precomputed lookups the decisions use.

DOMAINS = ("a.example.com", "b.example.com")
PEOPLE = tuple(f"{name}@{domain}" for name in ("ana", "bo", "cy") for domain in DOMAINS)
PATTERNS = PEOPLE + tuple(f"*@{domain}" for domain in DOMAINS)
CALLERS = (
    *PEOPLE,
    "dee@c.example.com",  # a domain no rule names
    "ana@x.a.example.com",  # a sub-domain: "*@a.example.com" does not cover it
    "ANA@A.Example.com",  # case does not matter
)
MALFORMED_CALLERS = ("ana@b.example.com@a.example.com", "ana", "", "*@a.example.com")
CONNECTIONS = ("c1", "c2", "c3")
UNKNOWN_CONNECTIONS = ("c9", "does-not-exist")  # in no rule of any generated policy
SCOPES = ("s1", "s2", "s3", "s4")
LIFETIMES = (60, 300, 900, 3600)

T = TypeVar("T")
P = ParamSpec("P")


def _outcome(decide: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | PolicyDenied:
    """The decision's answer, or its refusal, as a value."""
    try:
        return decide(*args, **kwargs)
    except PolicyDenied as denied:
        return denied


def _named(patterns: Sequence[str], caller: str) -> bool:
    """``caller`` is one of ``patterns``, exactly or by its whole domain."""
    email = caller.lower()
    return email in patterns or "*@" + email.rpartition("@")[2] in patterns


def _random_grants(rng: random.Random) -> tuple[GrantRule, ...]:
    return tuple(
        GrantRule(
            callers=tuple(rng.sample(PATTERNS, rng.randint(1, 3))),
            connections=tuple(rng.sample(CONNECTIONS, rng.randint(1, 2))),
            scopes=(
                (FULL_SCOPE,)
                if rng.random() < 0.2
                else tuple(rng.sample(SCOPES, rng.randint(1, 3)))
            ),
            max_lifetime_seconds=rng.choice(LIFETIMES),
        )
        for _ in range(rng.randint(0, 5))
    )


def _rules_for(grants: Sequence[GrantRule], caller: str, connection: str) -> list[GrantRule]:
    return [r for r in grants if connection in r.connections and _named(r.callers, caller)]


@pytest.mark.parametrize("seed", range(40))
def test_a_decision_never_grants_more_than_the_rules(seed: int) -> None:
    rng = random.Random(seed)
    grants = _random_grants(rng)
    policy = IssuePolicy(grants=grants)
    answers: set[type] = set()
    for _ in range(150):
        caller = rng.choice(CALLERS)
        connection = rng.choice(CONNECTIONS + UNKNOWN_CONNECTIONS)
        requested: list[str] | None = rng.choice(
            [None, [], rng.sample((*SCOPES, "s-other"), rng.randint(1, 3))]
        )
        min_ttl = rng.choice([None, 0, 60, 600, 900, 3600])
        rules = _rules_for(grants, caller, connection)
        full = any(FULL_SCOPE in rule.scopes for rule in rules)
        allowed = {scope for rule in rules for scope in rule.scopes} - {FULL_SCOPE}
        # Scopes the request resolves to (None: the full scope), and how long a token of
        # exactly those may live: each scope for as long as one rule granting it allows.
        resolved = None if full and not requested else set(requested or allowed)

        def lifetime(scope: str | None, rules: list[GrantRule] = rules) -> int:
            return max(
                (
                    r.max_lifetime_seconds
                    for r in rules
                    if FULL_SCOPE in r.scopes or (scope is not None and scope in r.scopes)
                ),
                default=0,
            )

        longest = (
            lifetime(None)
            if resolved is None
            else min((lifetime(s) for s in resolved), default=lifetime(None))
        )

        answer = _outcome(policy.authorize, caller, connection, requested, min_ttl)
        answers.add(type(answer))
        if isinstance(answer, PolicyDenied):  # refused only for a reason the rules give
            if not rules:
                assert answer.message == DENIED
            elif answer.message.startswith("scope not allowed: "):
                refused = answer.message.removeprefix("scope not allowed: ")
                assert not full and refused in (requested or ()) and refused not in allowed
            else:
                assert min_ttl is not None and min_ttl > longest, answer.message
            continue
        assert rules, "granted a connection no rule names for this caller"
        assert answer.connection_id == connection
        assert answer.full_scope_allowed is full
        assert answer.max_lifetime_seconds == longest
        assert min_ttl is None or min_ttl <= longest
        if answer.scopes is None:  # the full scope: only from a "*" rule, and only by default
            assert full and not requested
        else:
            assert full or set(answer.scopes) <= allowed
            assert set(answer.scopes) == (set(requested) if requested else allowed)
            assert list(answer.scopes) == sorted(set(answer.scopes))
    # Each seed's requests met both answers (else this checked little), unless it has no rules.
    assert answers == {TokenGrant, PolicyDenied} or not grants


@pytest.mark.parametrize("seed", range(40))
def test_unknown_and_ungranted_connections_are_denied_identically(seed: int) -> None:
    rng = random.Random(seed)
    grants = _random_grants(rng)
    policy = IssuePolicy(grants=grants)
    answers: set[tuple[str, str, int, str]] = set()
    kinds: set[str] = set()
    for caller in CALLERS + MALFORMED_CALLERS:
        for connection in CONNECTIONS + UNKNOWN_CONNECTIONS:
            if caller not in MALFORMED_CALLERS and _rules_for(grants, caller, connection):
                continue
            kinds.add("unknown" if connection in UNKNOWN_CONNECTIONS else "ungranted")
            # Whatever else the request holds, even a malformed scope or lifetime.
            for requested, min_ttl in ((None, None), (["s1"], 60), (["a b", "*"], -1)):
                with pytest.raises(PolicyDenied) as caught:
                    policy.authorize(caller, connection, requested, min_ttl)
                error = caught.value
                answers.add((error.message, error.code, error.http_status, repr(error)))
    assert kinds == {"unknown", "ungranted"}
    assert answers == {(DENIED, "access_denied", 403, repr(PolicyDenied(DENIED)))}


@pytest.mark.parametrize("seed", range(20))
def test_explain_agrees_with_authorize(seed: int) -> None:
    policy = IssuePolicy(grants=_random_grants(random.Random(seed)))
    for caller in CALLERS:
        explained = {a.connection_id: a for a in policy.explain(caller).connections}
        for connection in CONNECTIONS + UNKNOWN_CONNECTIONS:
            if connection not in explained:
                with pytest.raises(PolicyDenied, match=DENIED):
                    policy.authorize(caller, connection, None, None)
                continue
            allowance = explained[connection]
            default = None if allowance.full_scope_allowed else tuple(sorted(allowance.scopes))
            grant = policy.authorize(caller, connection, None, allowance.lifetime_for(default))
            assert grant.max_lifetime_seconds == allowance.lifetime_for(default)
            assert grant.max_lifetime_seconds <= allowance.max_lifetime_seconds
            assert grant.full_scope_allowed is allowance.full_scope_allowed
            assert grant.scopes == (
                None if allowance.full_scope_allowed else tuple(sorted(allowance.scopes))
            )


RELAY_NAMES = ("r1", "r2", "r3")
RELAY_CONNECTIONS = ("k1", "k2")  # never a relay's name: the policy file refuses that
PREFIXES = ("a/", "a/b", "c")
PLAIN_PATHS = ("a/", "/a/x", "a/b", "a/b/", "a/b/c", "a/bc", "c", "c/", "c/1", "cx", "b", "")
TRICK_PATHS = ("a/../c", "a/%2e%2e/c", "a//b", "c/%2f", "//c")


def _under(path: str, prefix: str) -> bool:
    """``path`` lies below ``prefix``, counted in whole segments; a prefix ending in ``/``
    asks for at least one more segment (possibly empty)."""
    want, have = prefix.split("/"), path.lstrip("/").split("/")
    if prefix.endswith("/"):
        return len(have) >= len(want) and have[: len(want) - 1] == want[:-1]
    return have[: len(want)] == want


def _random_relays(rng: random.Random) -> tuple[RelayRoute, ...]:
    return tuple(
        RelayRoute(
            name=name,
            connection=rng.choice(RELAY_CONNECTIONS),
            callers=tuple(rng.sample(PATTERNS, rng.randint(1, 3))),
            base_url="https://api.example.com/v1/",
            methods=frozenset(rng.sample(list(HttpMethod), rng.randint(1, 3))),
            path_prefixes=tuple(rng.sample(PREFIXES, rng.randint(1, 2))),
            inject=Inject.BEARER,
        )
        for name in rng.sample(RELAY_NAMES, rng.randint(0, 3))
    )


@pytest.mark.parametrize("seed", range(40))
def test_a_relay_opens_exactly_what_its_routes_allow(seed: int) -> None:
    rng = random.Random(seed)
    routes = _random_relays(rng)
    policy = IssuePolicy(relays=routes)
    for _ in range(150):
        caller = rng.choice(CALLERS + MALFORMED_CALLERS)
        target = rng.choice(RELAY_NAMES + RELAY_CONNECTIONS + ("nope",))
        method = rng.choice([*HttpMethod, "get", "TRACE"])
        path = rng.choice(PLAIN_PATHS + TRICK_PATHS)
        mine = [
            r
            for r in routes
            if target in (r.name, r.connection)
            and caller not in MALFORMED_CALLERS
            and _named(r.callers, caller)
        ]
        opening = [
            r
            for r in mine
            if path not in TRICK_PATHS
            and method in r.methods
            and any(_under(path, p) for p in r.path_prefixes)
        ]
        answer = _outcome(policy.relay, caller, target, method, path)
        if not mine:  # unknown, or not this caller's: one answer for both
            assert isinstance(answer, PolicyDenied)
            assert answer.message == RELAY_DENIED
        elif not opening:
            assert isinstance(answer, PolicyDenied)
        else:
            assert answer == opening[0]  # the first of the caller's routes that allows it
            assert answer.url_for(path).startswith(answer.base_url)


def test_callers_are_lower_cased_by_ascii_rules_only() -> None:
    """Issue 9: caller emails were case-folded with Unicode rules, so a KELVIN SIGN (U+212A)
    matched a granted ``k``. An identity is compared exactly, after lower-casing A-Z only."""
    from tokenbroker.issue.policy_file import parse_policy_text

    rules = parse_policy_text(
        'version = 1\n[[grants]]\ncallers = ["kay@p.iam.gserviceaccount.com"]\n'
        'connections = ["crm"]\nscopes = ["*"]\n'
    )
    assert rules.authorize("KAY@p.iam.gserviceaccount.com", "crm", None, None)  # ASCII: fine
    with pytest.raises(PolicyDenied):
        rules.authorize("\u212aay@p.iam.gserviceaccount.com", "crm", None, None)
