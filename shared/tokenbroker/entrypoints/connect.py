"""The connect function: operators connect accounts (the authorization-code flow) in the cloud.

Routes (Flask requests, as functions-framework serves an HTTP function):

* ``GET /`` -- the start page: the broker's ``refresh_token`` connections, their status, and a
  *Connect* button each.
* ``POST /connections/ID/connect`` -- the button: starts the flow
  (:meth:`~tokenbroker.refresh.authorize.AuthorizationFlow.start_existing`, the operator bound
  into the session) and answers ``303`` to the provider's authorization URL.
* ``GET /callback`` -- the provider's redirect: completed by
  :meth:`~tokenbroker.refresh.authorize.AuthorizationFlow.complete`, answered with a success or
  failure page.
* ``GET /healthz``. Anything else: a 404 page.

Every route first takes the operator from the platform and checks the allow-list
(:mod:`tokenbroker.entrypoints.operators`): a caller who is not an operator gets a 403 page
and nothing is read or started.

Why a POST with a form token, not a GET that redirects
------------------------------------------------------
Starting a flow is a state-changing request: a GET link on another site, opened by an
operator's browser (whose identity the proxy or IAP adds by itself), would start a flow, and a
provider that remembers the operator's consent answers at once -- re-connecting the connection
to whichever provider account that browser is signed in to (login CSRF, RFC 6749 §10.12,
RFC 9700 §4.7). So the button is a POST carrying a **form token**: an HMAC, under a key derived
from the session key, of (operator, connection, expiry; 10 minutes), which only a page read by
the operator holds (the same-origin policy keeps other sites from reading it). No cookie is
needed for it. Requests a browser labels ``Sec-Fetch-Site: cross-site`` or ``same-site`` are
refused as well. The ``Origin`` is not compared with the host: behind ``gcloud run services
proxy`` the browser's origin (localhost) is not the service's host.

The callback's own defences are the flow's: the state is single use and bound to the
operator and the connection. The connection comes from a cookie the POST set
(``tokenbroker_connect``: the connection id only, ``HttpOnly``, ``SameSite=Lax`` so the
provider's top-level redirect carries it, ``Path=/callback``, 10 minutes, ``Secure`` on
https): a state issued for another connection is refused. One flow per browser at a time.

The redirect URI is ``TOKENBROKER_CONNECT_URL`` + ``/callback``: the URL the operator's browser
uses -- behind the IAM proxy ``http://localhost:PORT`` (the provider sends the browser back
to the proxy, which adds the identity again), behind IAP the HTTPS address IAP serves.

Pages come from :mod:`tokenbroker.entrypoints.pages` (strict CSP; the start page's
``form-action`` allows ``'self'`` and the providers' authorization origins, since browsers
apply it to the redirect that follows the POST). No page, no ``Location`` we render but the
provider's authorization URL (which carries the state and the S256 challenge, never the
verifier), and no log line carries a code, a verifier or a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from tokenbroker.entrypoints.loopback import page_status
from tokenbroker.entrypoints.pages import PAGE_HEADERS, document, headers_with_form_action, page
from tokenbroker.kernel import trace
from tokenbroker.kernel.errors import (
    BadRequest,
    InvalidAuthorizationState,
    InvalidCallerToken,
    NotFound,
    PolicyDenied,
    TokenBrokerError,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import GrantType, validate_connection_id

if TYPE_CHECKING:
    from tokenbroker.entrypoints.compose import ConnectService
    from tokenbroker.refresh.authorize import Connected

COOKIE = "tokenbroker_connect"
FORM_TOKEN_SECONDS = 600
CALLBACK = "/callback"

Answer = tuple[str, int, list[tuple[str, str]]]

_service: ConnectService | None = None
_lock = threading.Lock()


def service() -> ConnectService:
    """The instance's service, built on the first request (cold start) and reused."""
    global _service  # noqa: PLW0603 - one per function instance, by design
    if _service is None:
        with _lock:
            if _service is None:
                from tokenbroker.entrypoints.compose import (  # noqa: PLC0415
                    build_connect,
                    start_logging,
                )

                start_logging()
                _service = build_connect()
    return _service


def shutdown() -> None:
    global _service
    with _lock:
        built, _service = _service, None
    if built is not None:
        built.close()


def _log() -> Any:
    return get_logger(component="connect")


# --- form tokens ------------------------------------------------------------------------------


def form_token(key: bytes, operator: str, connection_id: str, now: float) -> str:
    expires = int(now) + FORM_TOKEN_SECONDS
    return f"{expires}.{_form_mac(key, operator, connection_id, expires)}"


def form_token_holds(key: bytes, token: str, operator: str, connection_id: str, now: float) -> bool:
    expires_text, _, mac = token.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12 or int(expires_text) <= now:
        return False
    expected = _form_mac(key, operator, connection_id, int(expires_text))
    return hmac.compare_digest(mac, expected)


def _form_mac(key: bytes, operator: str, connection_id: str, expires: int) -> str:
    message = "\x1f".join(("connect-form", operator, connection_id, str(expires))).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


# --- answers ----------------------------------------------------------------------------------


def _page(body: str, status: int, headers: Mapping[str, str] | None = None) -> Answer:
    chosen = dict(headers or PAGE_HEADERS)
    chosen["Content-Type"] = "text/html; charset=utf-8"
    return body, status, list(chosen.items())


def _failure(error: TokenBrokerError, *, stored_nothing: bool = True) -> Answer:
    if isinstance(error, InvalidCallerToken):
        return _page(
            page(
                "Not signed in",
                "This page could not tell who you are (no valid identity from the platform).",
                ok=False,
                next_step="Open it through the IAM proxy (gcloud run services proxy) or IAP.",
            ),
            401,
        )
    if isinstance(error, PolicyDenied):
        return _page(
            page(
                "Not an operator",
                f"{error.message}; nothing was started or stored.",
                ok=False,
                next_step="Ask an administrator to add you to the broker's operators.",
            ),
            403,
        )
    status = page_status(error)
    if status >= 500 or error.http_status >= 500:
        message = f"The broker could not finish ({error.code}); the log says why."
    else:
        message = f"{error.message} ({error.code})"
    nothing = " Nothing was stored." if stored_nothing else ""
    return _page(
        page(
            "Not connected",
            message + nothing,
            ok=False,
            next_step="Go back to the connections page and start again.",
        ),
        status if status < 500 else 502 if error.retryable else 500,
    )


def _success(connected: Connected) -> Answer:
    cid = connected.record.connection.id
    narrower = (
        f" The provider did not grant: {' '.join(connected.missing_scopes)}."
        if connected.missing_scopes
        else ""
    )
    return _page(
        page(
            "Account connected",
            f"The connection {cid} is authorised and active.{narrower}",
            ok=True,
            next_step="You can close this window, or go back to the connections page.",
        ),
        200,
    )


# --- routes -----------------------------------------------------------------------------------


def _operator(svc: ConnectService, headers: Mapping[str, str]) -> str:
    return svc.operators.check(svc.identity.operator(headers))


def _start_page(svc: ConnectService, operator: str) -> Answer:
    records = [
        r for r in svc.flow.registry.state.list() if r.connection.grant is GrantType.REFRESH_TOKEN
    ]
    now = time.time()
    origins: set[str] = set()
    rows = []
    for record in records:
        c = record.connection
        try:
            url = svc.flow.registry.profile_for(c).authorization_url_for(c)
            parts = urlsplit(url)
            origins.add(f"{parts.scheme}://{parts.netloc}")
        except TokenBrokerError:
            url = ""
        token = form_token(svc.form_key, operator, c.id, now)
        button = (
            f'<form method="post" action="/connections/{quote(c.id, safe="")}/connect">'
            f'<input type="hidden" name="form_token" value="{html.escape(token)}">'
            f'<button type="submit">Connect {html.escape(c.id)}</button></form>'
            if url
            else "(its profile has no authorization URL)"
        )
        rows.append(
            f"<tr><td>{html.escape(c.id)}</td><td>{html.escape(c.profile)}</td>"
            f"<td>{html.escape(record.state.status.value)}</td><td>{button}</td></tr>"
        )
    table = (
        '<table><thead><tr><th scope="col">Connection</th><th scope="col">Provider</th>'
        '<th scope="col">Status</th><th scope="col"><span>Action</span></th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>No connection uses the refresh_token grant yet: add one with "
        "<code>tokenbroker add</code> first.</p>"
    )
    body = (
        "<h1>Connect an account</h1>"
        f"<p>Signed in as {html.escape(operator)}. Connecting sends you to the provider to "
        "sign in as the account holder and consent; you come back here when it is done.</p>"
        f"{table}"
    )
    return _page(document("Connect an account", body), 200, headers_with_form_action(origins))


def _begin(svc: ConnectService, operator: str, cid: str, form: Mapping[str, str],
           headers: Mapping[str, str]) -> Answer:  # fmt: skip
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site in ("cross-site", "same-site"):
        raise BadRequest("a connect request from another site is refused")
    if not form_token_holds(svc.form_key, form.get("form_token", ""), operator, cid, time.time()):
        raise BadRequest(
            "the form has expired or did not come from this page; open the connections page again"
        )
    start = svc.flow.start_existing(cid, operator=operator, redirect_uri=svc.redirect_uri)
    secure = "; Secure" if svc.public_url.startswith("https://") else ""
    cookie = (
        f"{COOKIE}={cid}; Path={CALLBACK}; Max-Age={FORM_TOKEN_SECONDS}; HttpOnly; "
        f"SameSite=Lax{secure}"
    )
    body = page(
        "Continue at the provider",
        "You are being sent to the provider to sign in and consent.",
        ok=True,
        next_step="If nothing happens, go back to the connections page and start again.",
    )
    body_, status, out = _page(body, 303)
    return body_, status, [*out, ("Location", start.url), ("Set-Cookie", cookie)]


def _callback(svc: ConnectService, operator: str, params: Sequence[tuple[str, str]],
              cookies: Mapping[str, str]) -> Answer:  # fmt: skip
    cid = cookies.get(COOKIE, "")
    try:
        validate_connection_id(cid)
    except TokenBrokerError:
        cid = ""  # the flow then refuses the state (consuming it) as another connection's
    clear = ("Set-Cookie", f"{COOKIE}=; Path={CALLBACK}; Max-Age=0; HttpOnly; SameSite=Lax")

    async def complete() -> Connected:
        async with svc.runtime.token_endpoint() as http:
            return await svc.flow.complete(http, params, connection_id=cid, operator=operator)

    try:
        connected = asyncio.run(complete())
    except TokenBrokerError as error:
        if isinstance(error, InvalidAuthorizationState):
            _log().warning("authorization callback refused", reason=error.reason,
                           error_code=error.code)  # fmt: skip
        body, status, out = _failure(error)
        return body, status, [*out, clear]
    body, status, out = _success(connected)
    return body, status, [*out, clear]


def _route(svc: ConnectService, request: Any) -> Answer:
    path: str = request.path
    operator = _operator(svc, request.headers)
    if path == "/" and request.method in ("GET", "HEAD"):
        return _start_page(svc, operator)
    if path == CALLBACK and request.method == "GET":
        return _callback(svc, operator, list(request.args.items(multi=True)), request.cookies)
    prefix, suffix = "/connections/", "/connect"
    if path.startswith(prefix) and path.endswith(suffix) and request.method == "POST":
        cid = path[len(prefix) : -len(suffix)]
        validate_connection_id(cid)
        return _begin(svc, operator, cid, request.form, request.headers)
    raise NotFound("no such page")


def handle(request: Any) -> Answer:
    """Every request to the connect function (a Flask request)."""
    path: str = request.path
    traced = trace.enter(trace.from_asgi_headers(_raw_headers(request.headers)))
    try:
        if path == "/healthz":
            return "ok", 200, [("Content-Type", "text/plain"), ("Cache-Control", "no-store")]
        return _route(service(), request)
    except NotFound as error:
        if error.message.startswith("connection"):  # the registry's: an unknown connection
            return _failure(error)
        return _page(
            page("Not found", "Nothing here.", ok=False, next_step="Go to the connections page."),
            404,
        )
    except TokenBrokerError as error:
        if error.http_status >= 500:
            _log().error("connect request failed", error_code=error.code, error=error.message)
        return _failure(error)
    except Exception as bug:  # noqa: BLE001 - last line: a page, never a traceback
        _log().exception("connect request failed unexpectedly", exception_type=type(bug).__name__)
        return _page(
            page(
                "Something went wrong",
                "tokenbroker failed unexpectedly (a bug); nothing was stored.",
                ok=False,
                next_step="Try again later; the log says more.",
            ),
            500,
        )
    finally:
        trace.leave(traced)


def _raw_headers(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


__all__ = ["COOKIE", "form_token", "form_token_holds", "handle", "shutdown"]
