"""The device authorization grant (RFC 8628): connecting an account where no browser can
reach the broker -- a headless operator's terminal, a jump host.

1. :func:`request_device_authorization` asks the provider's device authorization endpoint
   for a device code and a user code (§3.1, §3.2), authenticating the client as at the token
   endpoint;
2. the account holder opens the verification URI on any device, enters the user code,
   logs in and consents (§3.3);
3. :func:`poll_device_token` polls the token endpoint with the device code (§3.4) at the
   provider's ``interval``: ``authorization_pending`` waits another interval,
   ``slow_down`` adds 5 s to it for good (§3.5), transient failures back off, and the
   device code's ``expires_in`` bounds the whole wait; ``access_denied`` and
   ``expired_token`` end it.

Every value of the provider's answer is checked against RFC 8628's grammar and sane bounds
before it is shown or used: a provider's odd answer becomes a
:class:`~tokenbroker.kernel.errors.MalformedResponse` naming the field, never a hang or a
crash. The device code is a :class:`~tokenbroker.kernel.secret.Secret` (it is what the
token endpoint trades for the tokens); the user code is shown to the operator and to nobody
else (it is never logged: whoever holds it could approve the request with their own account).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from tokenbroker.kernel.clock import Clock
from tokenbroker.kernel.errors import (
    DEVICE_GRANT_ERRORS,
    AuthorizationPending,
    ConfigError,
    ExpiredToken,
    MalformedResponse,
    ProviderError,
    SlowDown,
)
from tokenbroker.kernel.model import ClientAuthMethod
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.authorization import check_endpoint_url
from tokenbroker.oauth.grants import grant_form, sent_secrets, token_request
from tokenbroker.oauth.token_response import AnswerRules, TokenResponse, answer_object
from tokenbroker.ports import TokenEndpoint

#: RFC 8628 §3.4.
DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
#: §3.2: "If no value is provided, clients MUST use 5 as the default."
DEFAULT_INTERVAL_SECONDS = 5
#: §3.5: on ``slow_down`` "the interval MUST be increased by 5 seconds for this and all
#: subsequent requests".
SLOW_DOWN_STEP_SECONDS = 5
#: Bounds believed of the provider's figures: an interval past five minutes, or a device code
#: said to live more than a day, is not a device flow a person is waiting on (Google's codes
#: last 30 minutes, oidc-provider's 10).
MAX_INTERVAL_SECONDS = 300
MAX_EXPIRES_IN_SECONDS = 86400
#: The last poll goes out this long before the device code expires.
DEADLINE_MARGIN_SECONDS = 1.0
#: Consecutive transient failures (5xx, 429, the network) polling tolerates, backing off.
MAX_TRANSIENT_FAILURES = 5
#: Longest verification URI shown (a URL that long is no address a person types).
MAX_URI_CHARS = 2048
#: Longest user code shown; RFC 8628 §6.1 suggests 8 characters, providers use up to ~12.
MAX_USER_CODE_CHARS = 64
_MAX_CODE_CHARS = 4096
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
# RFC 8628 Appendix A (device_code, user_code): 1*VSCHAR.
_VSCHAR = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True)
class DeviceAuthorization:
    """The provider's answer to a device authorization request (RFC 8628 §3.2), checked."""

    device_code: Secret
    #: What the account holder types at :attr:`verification_uri`. Shown, never logged.
    user_code: str
    verification_uri: str
    #: The URI with the user code in it (optional, §3.3.1), for a link or a QR code.
    verification_uri_complete: str | None
    expires_in: int
    interval: int

    def __repr__(self) -> str:  # the user code approves a request: not for logs either
        return (
            f"DeviceAuthorization(verification_uri={self.verification_uri!r}, "
            f"expires_in={self.expires_in}, interval={self.interval})"
        )


def _whole_seconds(value: object, name: str, default: int | None, maximum: int) -> int:
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedResponse(f"device authorization answer: {name} is not a number")
    if isinstance(value, float) and (not math.isfinite(value) or value != int(value)):
        raise MalformedResponse(f"device authorization answer: {name} is not whole seconds")
    seconds = int(value)
    if not 1 <= seconds <= maximum:
        raise MalformedResponse(
            f"device authorization answer: {name} = {seconds} is outside 1..{maximum}"
        )
    return seconds


def _code(data: Mapping[str, Any], name: str, limit: int) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedResponse(f"device authorization answer: {name} is missing")
    if len(value) > limit or _VSCHAR.fullmatch(value) is None:
        raise MalformedResponse(f"device authorization answer: {name} is not a printable code")
    return value


def _verification_uri(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedResponse(f"device authorization answer: {name} is missing")
    # Printed on the operator's terminal: printable ASCII only (no escape sequence, newline or
    # bidirectional override can redraw the prompt; RFC 3986 URIs are ASCII), and short.
    if len(value) > MAX_URI_CHARS or _PRINTABLE.fullmatch(value) is None:
        raise MalformedResponse(
            f"device authorization answer: {name} is not a printable URI of at most "
            f"{MAX_URI_CHARS} characters"
        )
    try:
        # Where the account holder is sent: https (or a loopback test server), like the
        # authorization endpoint (RFC 8628 §3.3 "the verification URI"; RFC 6749 §3.1).
        return check_endpoint_url(value, f"device authorization answer: {name}")
    except ConfigError as error:
        raise MalformedResponse(error.message) from None


def parse_device_authorization(data: Mapping[str, Any]) -> DeviceAuthorization:
    """The checked fields of a device authorization answer (RFC 8628 §3.2). Google answers
    ``verification_url`` for ``verification_uri`` (its limited-input device guide); both are
    read."""
    device_code = _code(data, "device_code", _MAX_CODE_CHARS)
    user_code = _code(data, "user_code", MAX_USER_CODE_CHARS)
    google = "verification_uri" not in data and "verification_url" in data
    uri_name = "verification_url" if google else "verification_uri"
    uri = _verification_uri(data.get(uri_name), uri_name)
    complete_raw = data.get("verification_uri_complete")
    complete = (
        None
        if complete_raw is None
        else _verification_uri(complete_raw, "verification_uri_complete")
    )
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=user_code,
        verification_uri=uri,
        verification_uri_complete=complete,
        expires_in=_whole_seconds(
            data.get("expires_in"), "expires_in", None, MAX_EXPIRES_IN_SECONDS
        ),
        interval=_whole_seconds(
            data.get("interval"), "interval", DEFAULT_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS
        ),
    )


def _device_rules(rules: AnswerRules | None) -> AnswerRules:
    return replace(rules or AnswerRules(), grant_errors=DEVICE_GRANT_ERRORS)


async def request_device_authorization(
    endpoint: TokenEndpoint,
    url: str,
    *,
    client_id: str | None,
    client_secret: Secret | None,
    auth_method: ClientAuthMethod,
    scopes: Sequence[str],
    rules: AnswerRules | None = None,
    now: datetime | None = None,
) -> DeviceAuthorization:
    """RFC 8628 §3.1: ask for a device code and a user code. Client authentication as at the
    token endpoint (§3.1: "the client MUST authenticate" when it is confidential); a refusal
    is raised as its classified error (§3.2 errors are RFC 6749 §5.2's)."""
    check_endpoint_url(url, "device_authorization_url")
    headers, form = grant_form(auth_method, client_id, client_secret, {}, scopes=scopes, extra=None)
    sent = [Secret(v) for v in sent_secrets(form, headers)]
    response = await endpoint.post_form(
        url, form, headers={"Accept": "application/json", **headers}
    )
    # The polling codes (authorization_pending...) mean nothing here: the profile's rules.
    data, _ = answer_object(
        response, rules=rules or AnswerRules(), known_secrets=[client_secret, *sent], now=now
    )
    return parse_device_authorization(data)


async def device_code_grant(
    endpoint: TokenEndpoint,
    token_url: str,
    *,
    device_code: Secret,
    client_id: str | None,
    client_secret: Secret | None,
    auth_method: ClientAuthMethod,
    rules: AnswerRules | None = None,
    now: datetime | None = None,
    known_secrets: Iterable[Secret | None] = (),
) -> TokenResponse:
    """RFC 8628 §3.4: one poll. ``authorization_pending``, ``slow_down`` and ``expired_token``
    come back as :class:`AuthorizationPending`, :class:`SlowDown`, :class:`ExpiredToken`."""
    grant = {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code.reveal()}
    headers, form = grant_form(auth_method, client_id, client_secret, grant, scopes=(), extra=None)
    return await token_request(
        endpoint,
        token_url,
        form,
        headers,
        error_aliases=None,
        rules=_device_rules(rules),
        now=now,
        known_secrets=[device_code, client_secret, *known_secrets],
    )


async def poll_device_token(
    endpoint: TokenEndpoint,
    token_url: str,
    authorization: DeviceAuthorization,
    *,
    client_id: str | None,
    client_secret: Secret | None,
    auth_method: ClientAuthMethod,
    clock: Clock,
    rules: AnswerRules | None = None,
    wait_seconds: float | None = None,
) -> TokenResponse:
    """Poll until the account holder has answered (RFC 8628 §3.4, §3.5), at most until the
    device code expires (or ``wait_seconds``, if shorter). Raises what ends the wait:
    :class:`~tokenbroker.kernel.errors.AccessDenied` (the account holder declined),
    :class:`ExpiredToken` (the code expired first, or the wait ran out), or the error of a
    refusal or of :data:`MAX_TRANSIENT_FAILURES` transient failures in a row."""
    limit = float(authorization.expires_in)
    if wait_seconds is not None:
        limit = min(limit, wait_seconds)
    deadline = clock.monotonic() + limit
    interval = float(authorization.interval)
    delay = interval
    failures = 0
    last: ProviderError | None = None
    while True:
        # A second before the code expires at the latest: at (or past) its expiry a provider
        # may have forgotten it and answer invalid_grant instead of expired_token.
        left = deadline - DEADLINE_MARGIN_SECONDS - clock.monotonic()
        if left <= 0:
            if last is not None:  # the provider failed, not the account holder
                raise last
            raise ExpiredToken(
                f"no answer from the account holder within {int(limit)} s (the device code's "
                "lifetime, or the wait asked for)"
            )
        # The last poll goes out at the deadline rather than never (an interval as long as
        # the code's life, or a backoff past it, still polls once).
        await clock.sleep(min(delay, left))
        try:
            return await device_code_grant(
                endpoint,
                token_url,
                device_code=authorization.device_code,
                client_id=client_id,
                client_secret=client_secret,
                auth_method=auth_method,
                rules=rules,
                now=clock.now(),
            )
        except AuthorizationPending:
            failures, delay, last = 0, interval, None
        except SlowDown:
            interval = min(interval + SLOW_DOWN_STEP_SECONDS, MAX_INTERVAL_SECONDS)
            failures, delay, last = 0, interval, None
        except ProviderError as error:
            # A success status the answer of which is unusable: the provider has likely spent
            # the device code, so the next poll would only hide this cause (invalid_grant).
            spent = isinstance(error, MalformedResponse) and 200 <= (error.status or 0) < 300
            if not error.retryable or spent:
                raise
            failures += 1
            if failures >= MAX_TRANSIENT_FAILURES:
                raise
            last = error
            # §3.5: back off on a failed connection; a Retry-After is honoured.
            backoff = interval * 2**failures
            if error.retry_after is not None:
                backoff = max(backoff, error.retry_after)
            delay = min(backoff, MAX_INTERVAL_SECONDS)


__all__ = [
    "DEFAULT_INTERVAL_SECONDS",
    "DEVICE_CODE_GRANT",
    "DeviceAuthorization",
    "device_code_grant",
    "parse_device_authorization",
    "poll_device_token",
    "request_device_authorization",
]
