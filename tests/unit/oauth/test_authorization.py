"""The authorization-code flow's protocol parts: PKCE, the authorization URL per profile, the
callback's parsing (RFC 6749 §4.1, RFC 7636)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest

from tokenbroker.kernel.errors import (
    AccessDenied,
    ConfigError,
    InvalidAuthorizationState,
    InvalidScope,
    UnknownProviderError,
)
from tokenbroker.kernel.model import Connection, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.authorization import (
    AuthorizationError,
    AuthorizationResponse,
    account_location,
    authorization_request_url,
    code_challenge,
    granted_scopes,
    missing_scopes,
    new_code_verifier,
    new_state,
    parse_callback,
    state_key,
)
from tokenbroker.oauth.profiles import load_profiles, parse_profile

PROFILES = load_profiles()
REDIRECT = "http://127.0.0.1:49152/callback"


def connection(profile: str = "generic", **changes: object) -> Connection:
    fields: dict[str, object] = {
        "id": "crm",
        "profile": profile,
        "grant": GrantType.REFRESH_TOKEN,
        "client_id": "client-1",
        "scopes": ("api:read", "offline_access"),
        "params": {"authorization_url": "https://idp.example/authorize"}
        if profile == "generic"
        else {},
    }
    fields.update(changes)
    return Connection(**fields)  # type: ignore[arg-type]


def query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


# --- PKCE -------------------------------------------------------------------------------------


def test_pkce_s256_matches_rfc7636_appendix_b() -> None:
    verifier = Secret("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_verifiers_are_43_unreserved_characters_and_fresh() -> None:
    verifiers = {new_code_verifier().reveal() for _ in range(50)}
    assert len(verifiers) == 50
    for v in verifiers:
        # RFC 7636 §4.1: 43..128 of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~"
        assert re.fullmatch(r"[A-Za-z0-9\-._~]{43,128}", v)


def test_state_is_at_least_128_bits_and_stored_by_its_hash() -> None:
    state = new_state()
    assert len(state.reveal()) >= 22  # 128 bits of base64url
    assert len(state.reveal()) >= 43  # we take 256
    assert state_key(state) != state.reveal()
    assert state.reveal() not in repr(state)
    assert len({new_state().reveal() for _ in range(50)}) == 50


# --- the authorization URL -----------------------------------------------------------------


def test_generic_url_carries_the_flow_and_the_connections_scopes() -> None:
    state, verifier = new_state(), new_code_verifier()
    url = authorization_request_url(
        PROFILES["generic"],
        connection(),
        redirect_uri=REDIRECT,
        state=state,
        challenge=code_challenge(verifier),
    )
    assert url.startswith("https://idp.example/authorize?")
    assert query(url) == {
        "response_type": ["code"],
        "client_id": ["client-1"],
        "redirect_uri": [REDIRECT],
        "scope": ["api:read offline_access"],
        "state": [state.reveal()],
        "code_challenge": [code_challenge(verifier)],
        "code_challenge_method": ["S256"],
    }
    assert verifier.reveal() not in url


def test_google_adds_offline_access_and_consent() -> None:
    url = authorization_request_url(
        PROFILES["google"],
        connection("google", scopes=("https://www.googleapis.com/auth/drive.readonly",)),
        redirect_uri=REDIRECT,
        state=new_state(),
        challenge="c" * 43,
    )
    assert url.startswith("https://accounts.google.com/o/oauth2/v2/auth?")
    q = query(url)
    assert q["access_type"] == ["offline"]
    assert q["prompt"] == ["consent"]
    assert q["code_challenge_method"] == ["S256"]


@pytest.mark.parametrize(
    ("centre", "host"), [("us", "accounts.zoho.com"), ("eu", "accounts.zoho.eu")]
)
def test_zoho_goes_to_the_data_centres_accounts_server(centre: str, host: str) -> None:
    url = authorization_request_url(
        PROFILES["zoho"],
        connection("zoho", params={"data_centre": centre}, scopes=("ZohoCRM.modules.ALL",)),
        redirect_uri=REDIRECT,
        state=new_state(),
        challenge="c" * 43,
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname, parts.path) == ("https", host, "/oauth/v2/auth")
    assert query(url)["access_type"] == ["offline"]
    assert query(url)["prompt"] == ["consent"]


def test_the_endpoints_own_query_is_kept() -> None:
    url = authorization_request_url(
        PROFILES["generic"],
        connection(params={"authorization_url": "https://idp.example/authorize?tenant=acme"}),
        redirect_uri=REDIRECT,
        state=new_state(),
        challenge="c" * 43,
    )
    assert parse_qsl(urlsplit(url).query)[0] == ("tenant", "acme")


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://idp.example/authorize",  # no TLS
        "https://idp.example/authorize#frag",  # RFC 6749 §3.1
        "https://user:pw@idp.example/authorize",
        "https://idp.example/authorize?state=fixed",  # would shadow the flow's state
    ],
)
def test_unsafe_authorization_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError):
        authorization_request_url(
            PROFILES["generic"],
            connection(params={"authorization_url": endpoint}),
            redirect_uri=REDIRECT,
            state=new_state(),
            challenge="c" * 43,
        )


def test_a_profile_without_an_authorization_url_cannot_connect() -> None:
    with pytest.raises(ConfigError, match="authorization_url"):
        authorization_request_url(
            PROFILES["generic"],
            connection(params={}),
            redirect_uri=REDIRECT,
            state=new_state(),
            challenge="c",
        )
    okta = PROFILES["okta"]
    with pytest.raises(ConfigError, match="cannot connect accounts"):
        okta.authorization_url_for(connection("okta", params={"domain": "a.okta.com"}))


def test_profile_extras_may_not_override_the_flow() -> None:
    profile = parse_profile(
        "evil",
        {
            "grants": ["refresh_token"],
            "token_url": "https://idp.example/token",
            "authorization_url": "https://idp.example/auth",
            "authorize_params": {"code_challenge_method": "plain"},
        },
        "profiles.evil",
    )
    with pytest.raises(ConfigError, match="code_challenge_method"):
        authorization_request_url(
            profile, connection("evil"), redirect_uri=REDIRECT, state=new_state(), challenge="c"
        )


def test_callback_params_must_name_a_param_with_values() -> None:
    with pytest.raises(ConfigError, match="callback_params"):
        parse_profile(
            "p",
            {"grants": ["refresh_token"], "callback_params": {"accounts-server": "nowhere"}},
            "profiles.p",
        )


# --- the callback ----------------------------------------------------------------------------


def test_a_code_and_state_are_read_as_secrets() -> None:
    parsed = parse_callback([("code", "the-code"), ("state", "s"), ("iss", "https://idp")])
    assert isinstance(parsed, AuthorizationResponse)
    assert parsed.code.reveal() == "the-code"
    assert "the-code" not in repr(parsed)
    assert parsed.extras == {"iss": "https://idp"}


@pytest.mark.parametrize(
    ("error", "cls"),
    [
        ("access_denied", AccessDenied),
        ("invalid_scope", InvalidScope),
        ("something_new", UnknownProviderError),
    ],
)
def test_provider_errors_are_classified(error: str, cls: type[Exception]) -> None:
    parsed = parse_callback(
        [("error", error), ("error_description", "The user said no\x00"), ("state", "s")]
    )
    assert isinstance(parsed, AuthorizationError)
    assert isinstance(parsed.error, cls)
    assert "The user said no" in parsed.error.message
    assert "\x00" not in parsed.error.message
    assert not parsed.error.retryable or error == "temporarily_unavailable"


@pytest.mark.parametrize(
    "params",
    [
        [("code", "c")],  # no state: not an answer to us
        [("state", "s")],  # neither code nor error
        [("code", "c"), ("state", "s"), ("state", "t")],  # RFC 6749 §3.1
        [("code", "c"), ("code", "d"), ("state", "s")],
        [("code", "c" * 5000), ("state", "s")],
    ],
)
def test_malformed_callbacks_are_refused(params: list[tuple[str, str]]) -> None:
    with pytest.raises(InvalidAuthorizationState) as caught:
        parse_callback(params)
    assert caught.value.reason == "malformed"
    assert "c" * 50 not in caught.value.message


# --- scopes and where the account lives --------------------------------------------------------


def test_granted_scopes_default_to_what_was_asked() -> None:
    assert granted_scopes(("a", "b"), None) == ("a", "b")
    assert granted_scopes(("a", "b"), ("a",)) == ("a",)
    assert missing_scopes(("a", "b", "c"), ("c", "a")) == ("b",)
    assert missing_scopes(("a",), ("a", "extra")) == ()


def test_zoho_accounts_server_sets_the_data_centre() -> None:
    zoho = PROFILES["zoho"]
    found = account_location(
        zoho, connection("zoho"), {"accounts-server": "https://accounts.zoho.eu"}
    )
    assert found == {"data_centre": "eu"}
    assert account_location(zoho, connection("zoho"), {}) == {}


@pytest.mark.parametrize(
    "server",
    [
        "https://accounts.evil.example",
        "http://accounts.zoho.eu",
        "https://accounts.zoho.eu.evil.example",
        "https://accounts.zoho.eu/steal",
    ],
)
def test_an_unknown_accounts_server_is_refused(server: str) -> None:
    with pytest.raises(InvalidAuthorizationState):
        account_location(PROFILES["zoho"], connection("zoho"), {"accounts-server": server})
