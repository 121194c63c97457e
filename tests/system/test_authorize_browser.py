"""Connecting an account in a real browser: ``tokenbroker authorize ID --no-browser`` as an
operator runs it (a subprocess; its printed URL), opened in a real headless Chromium driven by
Playwright through oidc-provider's own login and consent pages (the test server started with
``interactive``), to our loopback callback's page; then the stored connection refreshes.

Chromium is Debian's package (``/usr/bin/chromium``, or ``$TOKENBROKER_CHROMIUM``; ``.ci/run``
installs it when missing), never a browser build of Playwright's own (``playwright install`` is
never run). Without Chromium or the ``playwright`` package these tests skip, saying why.

Screenshots of the pages our loopback served are saved under ``$TOKENBROKER_TEST_ARTIFACTS``
(default ``tests/artifacts/``, ignored by git): ``authorize-success.png``,
``authorize-denied.png``.

The browser reaches nothing but 127.0.0.1: any other request (the provider's sign-in page
imports a web font) is aborted and recorded, and none may come from our page.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.oidc import TEST_ACCOUNT, OidcServer, start_oidc_server
from tests.system.test_authorize_oidc import Authorizing, Operator, new_connection_args
from tokenbroker.entrypoints.loopback import CONTENT_SECURITY_POLICY

pytestmark = pytest.mark.system

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("TOKENBROKER_CHROMIUM", "/usr/bin/chromium"))
#: Without the background-networking flags Chromium's own connections (to Google's update,
#: sync and safe-browsing hosts) are refused on a closed network and slow every page.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Maximal runs of RFC 7636 §4.1 verifier characters (43-128 of them).
VERIFIER_LIKE = re.compile(r"[A-Za-z0-9._~-]{43,128}")


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("TOKENBROKER_TEST_ARTIFACTS") or REPO_ROOT / "tests/artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def interactive_oidc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """oidc-provider with its real login and consent pages (devInteractions)."""
    server = start_oidc_server(tmp_path_factory, interactive=True)
    yield server
    server.stop()


@pytest.fixture
def oidc_pages(interactive_oidc: OidcServer) -> OidcServer:
    interactive_oidc.reset_stats()
    return interactive_oidc


class Browser:
    """One fresh Chromium profile; every request it makes is recorded (redirects too), and
    any request off the loopback address is aborted."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.requests: list[str] = []
        self.aborted: list[str] = []
        context.on("request", lambda request: self.requests.append(request.url))
        context.route("**/*", self._route)

    def _route(self, route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            self.aborted.append(url)
            route.abort()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            f"no Chromium at {CHROMIUM}: `apt-get install chromium` (as .ci/run does), "
            "or point TOKENBROKER_CHROMIUM at one"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed (the dev group pins it)"
    )
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh: no provider session, no cookies
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 900, "height": 600},
        )
        try:
            yield Browser(context)
        finally:
            context.close()


def sign_in(page: Any, url: str) -> None:
    """The provider's login form: a login and a password, then Sign-in; the consent page."""
    page.goto(url)
    login = page.locator("form input[name=login]")
    password = page.locator("form input[name=password]")
    assert password.get_attribute("type") == "password"
    login.fill(TEST_ACCOUNT)
    password.fill("correct horse battery staple")
    page.get_by_role("button", name="Sign-in").click()
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Authorize"  # the consent page
    assert "api:read" in page.locator("ul").first.inner_text()  # the scope asked for


def at_callback(response: Any) -> bool:
    parts = urlsplit(response.url)
    return (parts.hostname, parts.path) == ("127.0.0.1", "/callback")


def our_page(browser: Browser, page: Any, action: Any) -> tuple[Any, list[str]]:
    """Run ``action`` (a click on the consent page); return the callback's response as the
    browser received it and every request made from the callback on."""
    with page.expect_response(at_callback) as answer:
        action()
    response = answer.value
    page.wait_for_load_state("networkidle")
    since = browser.requests[browser.requests.index(response.url) :]
    return response, since


def assert_safe_page(browser: Browser, response: Any, since: list[str], html: str) -> None:
    """Our page's headers as the browser saw them; nothing it loads; nothing secret in it."""
    headers = response.all_headers()
    assert headers["content-type"].startswith("text/html")
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    origin = "http://" + urlsplit(response.url).netloc + "/"
    assert all(url.startswith(origin) for url in since), since
    assert not set(since) & set(browser.aborted)
    assert "<script" not in html and "src=" not in html and "http" not in html
    for name, values in parse_qs(urlsplit(response.url).query).items():
        if name in ("code", "state"):
            assert values[0] not in html


def assert_nothing_secret(texts: list[str], *, url: str, secrets: set[str]) -> None:
    """No code, token or PKCE verifier in ``texts``.  The verifier is known only to the CLI:
    any verifier-like string in the texts is checked against the URL's S256 challenge."""
    challenge = parse_qs(urlsplit(url).query)["code_challenge"][0]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        for candidate in VERIFIER_LIKE.findall(text):
            digest = hashlib.sha256(candidate.encode()).digest()
            assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != challenge


def screenshot(page: Any, name: str) -> Path:
    path = artifacts_dir() / name
    path.unlink(missing_ok=True)
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    return path


def start(operator: Operator, oidc: OidcServer) -> tuple[Authorizing, str]:
    running = operator.authorize(*new_connection_args(oidc, "crm"))
    url = running.url()
    assert url.startswith(oidc.authorization_url + "?")
    return running, url


def test_connect_in_a_real_browser_then_refresh(
    oidc_pages: OidcServer, browser: Browser, tmp_path: Path
) -> None:
    operator = Operator(tmp_path / "state")
    running, url = start(operator, oidc_pages)
    page = browser.context.new_page()
    sign_in(page, url)
    consent = page.get_by_role("button", name="Continue")
    response, since = our_page(browser, page, consent.click)

    assert response.status == 200
    assert page.title() == "tokenbroker: Account connected"
    assert page.locator("h1").inner_text() == "Account connected"
    assert page.locator("main p").all_inner_texts() == [
        "The connection crm is authorised and active.",
        "You can close this window and return to the terminal.",
    ]
    html = page.content()
    assert_safe_page(browser, response, since, html)
    screenshot(page, "authorize-success.png")

    done = running.finish()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"]["status"] == "active"
    assert result["authorized"]["new"] is True
    assert result["authorized"]["event"] == "connection.connected"
    assert oidc_pages.stats()["token_requests_by_grant_type"] == {"authorization_code": 1}
    code = parse_qs(urlsplit(response.url).query)["code"][0]
    issued = oidc_pages.ledger_tokens()
    assert issued  # the code exchange's access and refresh tokens
    assert_nothing_secret(
        [html, done.stdout, done.stderr, oidc_pages.stderr_path.read_text()],
        url=url,
        secrets={code, *issued},
    )

    refreshed = operator.run("--json", "refresh", "crm")
    assert refreshed.returncode == 0, refreshed.stderr
    assert json.loads(refreshed.stdout)["refreshed"] == 1
    stats = oidc_pages.stats()
    assert stats["token_requests_by_grant_type"] == {"authorization_code": 1, "refresh_token": 1}
    assert stats["refresh_token_reuse"] == 0
    shown = json.loads(operator.run("--json", "show", "crm").stdout)
    assert shown["state"]["status"] == "active"
    assert_nothing_secret(operator.outputs, url=url, secrets={code, *oidc_pages.ledger_tokens()})


def test_consent_denied_on_the_real_consent_page(
    oidc_pages: OidcServer, browser: Browser, tmp_path: Path
) -> None:
    operator = Operator(tmp_path / "state")
    running, url = start(operator, oidc_pages)
    page = browser.context.new_page()
    sign_in(page, url)
    cancel = page.get_by_role("link", name="[ Cancel ]")
    response, since = our_page(browser, page, cancel.click)

    assert parse_qs(urlsplit(response.url).query)["error"] == ["access_denied"]
    assert response.status == 403
    assert page.locator("h1").inner_text() == "Not connected"
    text = page.locator("main").inner_text()
    assert "denied" in text and "(access_denied)" in text
    assert "Nothing was stored" in text and "the terminal says what to do next" in text
    html = page.content()
    assert_safe_page(browser, response, since, html)
    screenshot(page, "authorize-denied.png")

    done = running.finish()
    assert done.returncode == 1
    assert "denied" in done.stderr and "access_denied" in done.stderr
    # What the page sends the account holder back to the terminal for: the next step.
    assert done.stderr.splitlines()[-1].endswith(
        "; nothing was stored: to connect crm, run the same `tokenbroker authorize` command "
        "again and allow access"
    )
    assert oidc_pages.stats()["token_requests"] == 0
    assert operator.run("show", "crm").returncode == 1  # nothing registered
    assert_nothing_secret([html, done.stdout, done.stderr], url=url, secrets=set())
