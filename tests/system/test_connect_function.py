"""The connect function as deployed: a real functions-framework process serving
``functions/connect/main.py`` on the gcp backend (Secret Manager test server, Firestore and
Pub/Sub emulators), against oidc-provider with non-interactive consent.

The operator is presented as Cloud Run's IAM front end presents a caller (``platform`` mode):
a Google-shaped ID token whose signature was replaced by ``SIGNATURE_REMOVED_BY_GOOGLE``, with
gcloud's client id as audience (what ``gcloud run services proxy`` sends for a user). The
browser is an HTTP client that keeps the one cookie the function sets. Start page -> POST
(form token) -> provider -> callback -> the connection is stored active with new tokens and
``connection.connected`` is published; then the refusals, the pages' headers, and no code,
state, verifier or token in any page, Location we render, or log line.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.emulators import emulator
from tests.support.iap import AUDIENCE as IAP_AUDIENCE
from tests.support.iap import IapKeys
from tests.support.jwks_server import JwksServer
from tests.support.leaks import recoverable
from tests.support.oidc import CONNECT_ID, CONNECT_SECRET, OidcServer, free_port
from tests.system.helpers import caller_id_token, registry
from tests.system.processes import REPO, functions_framework
from tokenbroker.adapters.gcp.firestore_sessions import FirestoreAuthorizationSessions
from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.operators import GCLOUD_CLIENT_ID
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import (
    ClientAuthMethod,
    Connection,
    ConnectionStatus,
    Credential,
    GrantType,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.authorization import state_key

pytestmark = pytest.mark.system

SOURCE = REPO / "functions" / "connect" / "main.py"
OPERATOR = "alice@example.com"
OUTSIDER = "mallory@example.org"
REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
CSP_START = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'"


@dataclass
class Deployment:
    url: str
    env: dict[str, str]
    runtime: Runtime
    oidc: OidcServer
    subscription: str
    log_path: Path
    #: Every answer the function gave, for the leak scan.
    answers: list[httpx.Response] = field(default_factory=list)
    #: Every secret seen in the flows (codes, states, verifiers, tokens).
    secrets_seen: list[str] = field(default_factory=list)
    #: Behind IAP (``iap`` mode): the proxy's signing key; else Cloud Run IAM (``platform``).
    iap: IapKeys | None = None

    def identity(self, email: str = OPERATOR) -> dict[str, str]:
        """The operator as the platform presents them to the container."""
        if self.iap is not None:
            return {"X-Goog-IAP-JWT-Assertion": self.iap.assertion(email)}
        header, payload, _ = caller_id_token(self.oidc, GCLOUD_CLIENT_ID, email).split(".")
        return {"Authorization": f"Bearer {header}.{payload}.{REMOVED}"}

    def request(self, method: str, path: str, *, email: str | None = OPERATOR,
                **kwargs: Any) -> httpx.Response:  # fmt: skip
        headers = {**(self.identity(email) if email else {}), **kwargs.pop("headers", {})}
        answer = httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)
        self.answers.append(answer)
        return answer

    def events(self) -> list[dict[str, Any]]:
        import json

        from google.api_core.exceptions import DeadlineExceeded
        from google.cloud import pubsub_v1

        seen = []
        with pubsub_v1.SubscriberClient() as subscriber:
            try:
                response = subscriber.pull(
                    request={"subscription": self.subscription, "max_messages": 100},
                    timeout=5.0,
                    retry=None,
                )
            except DeadlineExceeded:
                return []
            seen.extend(json.loads(m.message.data) for m in response.received_messages)
            if response.received_messages:
                subscriber.acknowledge(
                    request={
                        "subscription": self.subscription,
                        "ack_ids": [m.ack_id for m in response.received_messages],
                    }
                )
        return seen

    def verifier_for(self, authorization_url: str) -> str:
        """The PKCE verifier of a started flow, read (not taken) from the session store."""
        state = parse_qs(urlsplit(authorization_url).query)["state"][0]
        sessions = FirestoreAuthorizationSessions(
            session_key=Secret(self.env["TOKENBROKER_SESSION_KEY"]),
            project=self.env["TOKENBROKER_GCP_PROJECT"],
            emulator_host=self.env["FIRESTORE_EMULATOR_HOST"],
        )
        try:
            key = state_key(Secret(state))
            data = sessions._doc(key).get().to_dict()
            return sessions._session(key, data).code_verifier.reveal()
        finally:
            sessions.close()


@pytest.fixture(scope="module")
def secret_manager() -> Iterator[Any]:
    from tests.support.secretmanager_server import SecretManagerTestServer

    server = SecretManagerTestServer().start()
    yield server
    server.stop()


@contextmanager
def _deploy(
    oidc: OidcServer, secret_manager: Any, capture: Path, name: str, **extra_env: str
) -> Iterator[Deployment]:
    """A project of its own (topic, subscription, state) and the function serving it."""
    emulator("firestore")
    emulator("pubsub")
    from google.cloud import pubsub_v1

    project = f"tb-connect-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = {
        "TOKENBROKER_BACKEND": "gcp",
        "TOKENBROKER_GCP_PROJECT": project,
        "TOKENBROKER_SECRET_MANAGER_ENDPOINT": secret_manager.address,
        "TOKENBROKER_METRICS": "off",
        "TOKENBROKER_LOG_LEVEL": "debug",
        "TOKENBROKER_CONNECT_URL": f"http://127.0.0.1:{port}",
        "TOKENBROKER_OPERATOR_IDENTITY": "platform",
        "TOKENBROKER_ID_TOKEN_ISSUERS": oidc.issuer,
        "TOKENBROKER_CONNECT_OPERATORS": f"user:{OPERATOR},domain:ops.example.com",
        "TOKENBROKER_SESSION_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
        "TOKENBROKER_TEST_CAPTURE_DIR": str(capture),
        "FIRESTORE_EMULATOR_HOST": emulator("firestore").host,
        "PUBSUB_EMULATOR_HOST": emulator("pubsub").host,
        **extra_env,
    }
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, "tokenbroker-events")
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(project, "connect-" + uuid.uuid4().hex[:8])
    subscriber.create_subscription(
        request={"name": subscription, "topic": topic, "enable_message_ordering": True}
    )
    subscriber.close()
    runtime = build_runtime(Settings.from_env(env))
    try:
        with functions_framework("connect_http", SOURCE, env, name=name, port=port) as url:
            yield Deployment(url, env, runtime, oidc, subscription, capture / f"{name}.process.out")
    finally:
        runtime.close()


@pytest.fixture(scope="module")
def deployment(
    oidc_server: OidcServer, secret_manager: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    capture = tmp_path_factory.mktemp("connect-logs")
    with _deploy(oidc_server, secret_manager, capture, "connect-function") as d:
        yield d


@pytest.fixture(scope="module")
def behind_iap(
    oidc_server: OidcServer, secret_manager: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    keys = IapKeys()
    capture = tmp_path_factory.mktemp("connect-iap-logs")
    with JwksServer(keys.jwks()) as published, _deploy(
        oidc_server, secret_manager, capture, "connect-function-iap",
        TOKENBROKER_OPERATOR_IDENTITY="iap", TOKENBROKER_IAP_AUDIENCE=IAP_AUDIENCE,
        TOKENBROKER_IAP_KEYS_URL=published.url,
    ) as d:  # fmt: skip
        d.iap = keys
        yield d


def _register(d: Deployment, cid: str) -> None:
    registry(d.runtime).register(
        Connection(
            id=cid,
            profile="generic",
            grant=GrantType.REFRESH_TOKEN,
            client_id=CONNECT_ID,
            token_url=d.oidc.token_url,
            auth_method=ClientAuthMethod.BASIC,
            scopes=("api:read",),
            params={"authorization_url": d.oidc.authorization_url},
        ),
        Credential(
            refresh_token=Secret(f"rt-before-{cid}-{uuid.uuid4().hex}"),
            client_secret=Secret(CONNECT_SECRET),
        ),
    )


def _form_token(start_page: httpx.Response, cid: str) -> str:
    match = re.search(
        rf'action="/connections/{cid}/connect"><input type="hidden" name="form_token" '
        r'value="([^"]+)"',
        start_page.text,
    )
    assert match, start_page.text
    return match.group(1)


def _begin(d: Deployment, cid: str, *, email: str = OPERATOR) -> tuple[str, str]:
    """The start page, then the button: the provider's URL and the cookie set."""
    start = d.request("GET", "/", email=email)
    assert start.status_code == 200, start.text
    begun = d.request(
        "POST", f"/connections/{cid}/connect", email=email,
        data={"form_token": _form_token(start, cid)},
        headers={"Sec-Fetch-Site": "same-origin"},
    )  # fmt: skip
    assert begun.status_code == 303, begun.text
    location = begun.headers["location"]
    assert location.startswith(d.oidc.authorization_url + "?")
    d.secrets_seen.append(parse_qs(urlsplit(location).query)["state"][0])
    d.secrets_seen.append(d.verifier_for(location))
    cookie = begun.headers["set-cookie"]
    assert cookie.startswith(f"tokenbroker_connect={cid}; Path=/callback;")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    return location, cookie.split(";", 1)[0]


def _call_back(
    d: Deployment, callback: str, cookie: str, *, email: str = OPERATOR
) -> httpx.Response:
    parts = urlsplit(callback)
    assert f"{parts.scheme}://{parts.netloc}" == d.url and parts.path == "/callback"
    code = parse_qs(parts.query).get("code")
    if code:
        d.secrets_seen.append(code[0])
    return d.request("GET", f"/callback?{parts.query}", email=email, headers={"Cookie": cookie})


def _assert_page(answer: httpx.Response) -> None:
    assert answer.headers["content-type"].startswith("text/html")
    assert answer.headers["content-security-policy"].startswith(CSP_START)
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in answer.text and "src=" not in answer.text
    assert '<html lang="en">' in answer.text


def test_an_operator_connects_an_account(deployment: Deployment) -> None:
    d = deployment
    _register(d, "crm")
    d.events()  # drain whatever registering published
    start = d.request("GET", "/")
    _assert_page(start)
    assert "crm" in start.text and OPERATOR in start.text
    policy = start.headers["content-security-policy"]
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(d.oidc.authorization_url))
    assert f"form-action 'self' {origin}" in policy

    location, cookie = _begin(d, "crm")
    query = parse_qs(urlsplit(location).query)
    assert query["redirect_uri"] == [d.url + "/callback"]
    assert query["code_challenge_method"] == ["S256"]
    callback = d.oidc.follow_authorization(location)
    page = _call_back(d, callback, cookie)
    assert page.status_code == 200, page.text
    _assert_page(page)
    assert "Account connected" in page.text
    assert "tokenbroker_connect=;" in page.headers["set-cookie"]  # cleared
    assert "location" not in page.headers

    record = d.runtime.state.get("crm")
    assert record.state.status is ConnectionStatus.ACTIVE
    stored = d.runtime.secrets.get("crm")
    assert stored.version == 2
    assert stored.credential.refresh_token is not None
    assert not stored.credential.refresh_token.reveal().startswith("rt-before-")
    d.secrets_seen.append(stored.credential.refresh_token.reveal())
    if stored.credential.access_token is not None:
        d.secrets_seen.append(stored.credential.access_token.reveal())
    events = [e for e in d.events() if e.get("connection_id") == "crm"]
    assert [e["type"] for e in events] == ["connection.connected"]

    # The same callback again (a replayed state): refused, nothing sent to the provider.
    exchanges = d.oidc.stats()
    replay = _call_back(d, callback, cookie)
    assert replay.status_code == 400
    _assert_page(replay)
    assert "invalid_state" in replay.text
    assert d.oidc.stats() == exchanges
    assert d.runtime.secrets.get("crm").version == 2


def test_a_state_for_another_connection_is_refused(deployment: Deployment) -> None:
    d = deployment
    _register(d, "erp")
    _register(d, "hr")
    erp_url, _ = _begin(d, "erp")
    _, hr_cookie = _begin(d, "hr")  # the browser's cookie now names hr
    callback = d.oidc.follow_authorization(erp_url)
    page = _call_back(d, callback, hr_cookie)
    assert page.status_code == 400
    _assert_page(page)
    assert "another connection" in page.text and "Nothing was stored" in page.text
    # Consumed by that presentation: the right cookie cannot use it any more either.
    again = _call_back(d, callback, "tokenbroker_connect=erp")
    assert again.status_code == 400
    assert "already used" in again.text
    assert d.runtime.secrets.get("erp").version == 1


def test_consent_denied_says_so(deployment: Deployment) -> None:
    d = deployment
    _register(d, "billing")
    location, cookie = _begin(d, "billing")
    d.oidc.set_consent(deny=True)
    try:
        callback = d.oidc.follow_authorization(location)
    finally:
        d.oidc.set_consent(deny=False)
    assert "error=access_denied" in callback
    page = _call_back(d, callback, cookie)
    assert page.status_code == 403
    _assert_page(page)
    assert "access_denied" in page.text and "Nothing was stored" in page.text
    assert d.runtime.secrets.get("billing").version == 1


def test_who_is_not_an_operator_gets_nothing(deployment: Deployment) -> None:
    d = deployment
    _register(d, "ledger")
    outsider = d.request("GET", "/", email=OUTSIDER)
    assert outsider.status_code == 403
    _assert_page(outsider)
    assert "Not an operator" in outsider.text and "ledger" not in outsider.text
    # An operator's form token does not help an outsider either.
    token = _form_token(d.request("GET", "/"), "ledger")
    posted = d.request(
        "POST", "/connections/ledger/connect", email=OUTSIDER, data={"form_token": token}
    )
    assert posted.status_code == 403 and "location" not in posted.headers
    # No identity at all (the platform would not let this through; the function refuses too).
    anonymous = d.request("GET", "/", email=None)
    assert anonymous.status_code == 401
    _assert_page(anonymous)
    # A token with its signature (not what Cloud Run delivers in platform mode) is refused.
    signed = caller_id_token(d.oidc, GCLOUD_CLIENT_ID, OPERATOR)
    forged = httpx.get(d.url + "/", headers={"Authorization": f"Bearer {signed}"}, timeout=30)
    assert forged.status_code == 401
    # A domain on the allow-list admits its members.
    assert d.request("GET", "/", email="bob@ops.example.com").status_code == 200


def test_the_start_button_needs_the_pages_form_token(deployment: Deployment) -> None:
    d = deployment
    _register(d, "crm2")
    start = d.request("GET", "/")
    for data in ({}, {"form_token": "9999999999.00"}, {"form_token": _form_token(start, "crm")}):
        refused = d.request("POST", "/connections/crm2/connect", data=data)
        assert refused.status_code == 400, data
        assert "location" not in refused.headers
    cross = d.request(
        "POST", "/connections/crm2/connect", data={"form_token": _form_token(start, "crm2")},
        headers={"Sec-Fetch-Site": "cross-site"},
    )  # fmt: skip
    assert cross.status_code == 400 and "location" not in cross.headers
    assert d.request("GET", "/connections/crm2/connect").status_code == 404
    assert d.request("POST", "/connections/nope/connect", data={}).status_code in (400, 404)


def test_behind_iap_the_signed_header_names_the_operator(behind_iap: Deployment) -> None:
    """``iap`` mode: the operator connects with IAP's signed header; the unsigned identity
    headers IAP also sets (and anyone bypassing IAP can forge) are never believed."""
    d = behind_iap
    _register(d, "crm")
    location, cookie = _begin(d, "crm")
    page = _call_back(d, d.oidc.follow_authorization(location), cookie)
    assert page.status_code == 200, page.text
    _assert_page(page)
    assert d.runtime.state.get("crm").state.status is ConnectionStatus.ACTIVE
    assert d.runtime.secrets.get("crm").version == 2
    forged = {"X-Goog-Authenticated-User-Email": f"accounts.google.com:{OPERATOR}"}
    assert d.request("GET", "/", email=None, headers=forged).status_code == 401
    assert d.request("GET", "/", email=OUTSIDER).status_code == 403
    other_key = IapKeys(kid=d.iap.kid if d.iap else "")
    header = {"X-Goog-IAP-JWT-Assertion": other_key.assertion(OPERATOR)}
    assert d.request("GET", "/", email=None, headers=header).status_code == 401
    # Its own Cloud Run identity token does not pass in iap mode.
    header, payload, _ = caller_id_token(d.oidc, GCLOUD_CLIENT_ID, OPERATOR).split(".")
    platform = {"Authorization": f"Bearer {header}.{payload}.{REMOVED}"}
    assert d.request("GET", "/", email=None, headers=platform).status_code == 401


def test_no_code_verifier_state_or_token_in_pages_locations_or_logs(
    deployment: Deployment,
) -> None:
    """Runs last in this module: scans everything the earlier tests produced."""
    d = deployment
    assert len(d.secrets_seen) >= 8
    logs = d.log_path.read_text(errors="replace")
    assert "connect request failed unexpectedly" not in logs
    for answer in d.answers:
        body = answer.text
        location = answer.headers.get("location", "")
        for value in d.secrets_seen:
            assert not recoverable(body, value, window=16), (answer.url, body[:200])
        if location:  # only the provider's authorization URL: the state, never the rest
            query = parse_qs(urlsplit(location).query)
            assert "code" not in query and "code_verifier" not in query
    for value in d.secrets_seen:
        assert value not in logs
        assert not recoverable(logs, value, window=16)
