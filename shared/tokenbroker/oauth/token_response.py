"""Turning a token endpoint's HTTP answer into a token or a classified error.

RFC 6749 §5.1 (successful response) and §5.2 (error response); RFC 6585 §4 and RFC 9110
§10.2.3 for 429/503 with ``Retry-After``. Raw HTTP bodies become exceptions here, at the
boundary, and nowhere else (cf. google-auth ``_client._handle_error_response``).

Everything in an answer is provider input and is checked against documented bounds before
anything else sees it: whatever the body, the result is a :class:`TokenResponse` whose values
are usable as they are, or a :class:`~tokenbroker.kernel.errors.ProviderError` -- never another
exception. Each error also says whether the answer is *ambiguous* (the provider may have spent
the refresh token) and keeps a new refresh token that an unusable answer carried.

Provider text (error codes and descriptions, kept extras, scopes) is scrubbed here of every
secret known for the exchange -- what the caller passes in ``known_secrets`` and the tokens
of the answer itself -- by value and by shape (:class:`~tokenbroker.kernel.redact.Scrubber`),
so an echoed refresh token never reaches a message, a log line, an event or a stored value.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from tokenbroker.kernel.errors import (
    OAUTH_ERRORS,
    InvalidClient,
    MalformedResponse,
    ProviderError,
    ProviderServerError,
    TemporarilyUnavailable,
    UnknownProviderError,
)
from tokenbroker.kernel.http import HttpResponse, parse_retry_after
from tokenbroker.kernel.redact import Scrubber, is_sensitive_key
from tokenbroker.kernel.secret import Secret

#: The longest access-token lifetime believed. RFC 6749 §5.1 gives ``expires_in`` no upper
#: bound; a year is beyond every provider we know, and anything longer (``1e15``,
#: ``Infinity``) is treated as not stated rather than stored as a date past year 9999.
MAX_LIFETIME_SECONDS = 366 * 86400
#: The lifetime assumed when nothing in the answer states one and the profile documents none.
#: RFC 6749 §5.1 leaves it to the provider's documentation; undocumented, assume short: a
#: token refreshed too early costs a request, one believed past its expiry breaks consumers.
DEFAULT_LIFETIME_SECONDS = 900
#: Longest token accepted. Stored tokens live in secret stores with small payload limits
#: (Secret Manager: 64 KiB per version) and go into HTTP headers.
MAX_TOKEN_CHARS = 16384
#: Longest non-secret text kept from an answer (``api_domain``, a scope).
_MAX_TEXT_CHARS = 2048
#: Shown of a provider's error code and description.
_ERROR_CODE_CHARS = 64
_DESCRIPTION_CHARS = 200

# RFC 6749 Appendix A.12 (access-token) and A.17 (refresh-token): 1*VSCHAR, %x20-7E.
_VSCHAR = re.compile(r"[\x20-\x7e]+")
# RFC 6749 §7.1: token_type is a type name; it becomes an HTTP auth-scheme (RFC 9110 §11.1,
# a token of tchar), so nothing else is accepted.
_TOKEN_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# Integers beyond this are not exact as floats (and far beyond any date).
_MAX_EXACT_FLOAT = 2**53
# C0 and C1 control characters, DEL, and the bidirectional overrides and isolates.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# ``expires_in`` sent as a JSON string ("3600"): ASCII decimals only.
_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")
# Non-secret fields of a token response worth keeping (Zoho's api_domain, Salesforce's
# instance_url, RFC 8707's resource).
_KEPT_EXTRAS = ("api_domain", "instance_url", "resource")
# The success statuses at which the provider may have processed the request but whose answer
# is unusable. 5xx answers without an OAuth error body are ambiguous too, except these: the
# server says it did not handle the request (RFC 9110 §15.6.2, §15.6.4, §15.6.6).
_UNHANDLED_5XX = frozenset({501, 503, 505})


class LifetimeSource(StrEnum):
    """Where :attr:`TokenResponse.lifetime_seconds` came from."""

    #: The answer's ``expires_in`` (RFC 6749 §5.1), within bounds.
    EXPIRES_IN = "expires_in"
    #: The ``exp`` claim of a JWT access token (RFC 9068 §2.2), read unverified.
    JWT_EXP = "jwt_exp"
    #: Nothing said: the profile's documented default, or the conservative one.
    PROFILE_DEFAULT = "profile_default"


@dataclass(frozen=True)
class ThrottleRule:
    """A provider's own way of saying "too many requests" without 429.

    Zoho answers a token request over its limits with HTTP 200 (or 400) and
    ``{"error": "Access Denied", "error_description": "You have made too many requests
    continuously..."}``: without this rule that is an unknown error code, permanent, and the
    connection would be sent to ``needs_reauth`` for being busy.
    """

    #: Error codes (compared case-insensitively) that always mean throttling.
    errors: frozenset[str] = frozenset()
    #: Case-insensitive fragments of ``error_description`` that mean throttling whatever code.
    descriptions: tuple[str, ...] = ()
    #: How long to wait when the answer has no ``Retry-After``.
    retry_after_seconds: int = 60

    def matches(self, code: str, description: str) -> bool:
        if code.strip().casefold() in self.errors:
            return True
        text = description.casefold()
        return any(fragment in text for fragment in self.descriptions)


@dataclass(frozen=True)
class AnswerRules:
    """What a provider's profile says about reading its token endpoint's answers."""

    #: Provider error codes to RFC 6749 §5.2 names (``invalid_code`` -> ``invalid_grant``).
    error_aliases: Mapping[str, str] = field(default_factory=dict)
    throttle: ThrottleRule | None = None
    #: Lifetime of an access token whose answer states none (RFC 6749 §5.1).
    default_lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS
    #: Whether a refresh retires the refresh token used; decides what an unusable new
    #: ``refresh_token`` means (see :func:`parse_token_response`). Assume the worst.
    rotates_refresh_tokens: bool = True
    #: Error codes one grant defines beyond RFC 6749 §5.2 (the device-code grant's
    #: ``authorization_pending``, ``slow_down``, ``expired_token``: RFC 8628 §3.5).
    grant_errors: Mapping[str, type[ProviderError]] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenResponse:
    """A usable token response, every value within bounds."""

    access_token: Secret
    token_type: str
    #: ``expires_in`` as stated, when stated and believable (1 s to a year).
    expires_in: int | None = None
    refresh_token: Secret | None = None
    scope: tuple[str, ...] | None = None
    extras: Mapping[str, str] = field(default_factory=dict)
    #: How long the access token lasts, always set and bounded: ``expires_in``, else a JWT's
    #: ``exp``, else the profile's default (:class:`LifetimeSource` says which).
    lifetime_seconds: int = DEFAULT_LIFETIME_SECONDS
    lifetime_source: LifetimeSource = LifetimeSource.PROFILE_DEFAULT
    #: What was odd but survivable about the answer (codes and field names, no values).
    warnings: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (
            f"TokenResponse(token_type={self.token_type!r}, expires_in={self.expires_in}, "
            f"lifetime_seconds={self.lifetime_seconds} ({self.lifetime_source.value}), "
            f"rotated={self.refresh_token is not None}, scope={self.scope})"
        )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: "[[[[..." nested deeper than the parser's stack.
        return None
    return data if isinstance(data, dict) else None


def _text(value: object, limit: int, scrubber: Scrubber) -> str:
    """A provider's value as scrubbed, bounded text for a message. Cut after scrubbing, from
    a window long enough that no secret starting inside the limit is split."""
    text = value if isinstance(value, str) else _describe(value)
    window = limit + max(MAX_TOKEN_CHARS, scrubber.longest)
    # No control character (a terminal escape, a newline forging a line) reaches a message.
    return _CONTROL.sub("?", scrubber(text[:window]))[:limit]


def _answer_secrets(data: Mapping[str, Any] | None) -> list[str]:
    """The credential values in an answer (its tokens), to scrub from the answer's own text."""
    if data is None:
        return []
    return [v for k, v in data.items() if isinstance(v, str) and is_sensitive_key(str(k))]


def _describe(value: object) -> str:
    try:
        return json.dumps(value)[:MAX_TOKEN_CHARS]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _usable_token(value: object) -> bool:
    """RFC 6749 Appendix A.12/A.17: ``1*VSCHAR``; not blank, and small enough to store."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TOKEN_CHARS
        and bool(value.strip())
        and _VSCHAR.fullmatch(value) is not None
    )


def _carried_refresh_token(data: Mapping[str, Any] | None) -> Secret | None:
    """A usable refresh token in an answer that is otherwise unusable, to keep on the error."""
    value = data.get("refresh_token") if data is not None else None
    return Secret(value) if isinstance(value, str) and _usable_token(value) else None


def _error_from_body(
    data: Mapping[str, Any],
    status: int,
    retry_after: float | None,
    rules: AnswerRules,
    scrubber: Scrubber,
) -> ProviderError:
    raw = data.get("error")
    raw_code = raw if isinstance(raw, str) else _describe(raw)
    shown_code = _text(raw_code, _ERROR_CODE_CHARS, scrubber)
    description_raw = data.get("error_description")
    description = description_raw if isinstance(description_raw, str) else ""
    shown_description = (
        _text(description_raw, _DESCRIPTION_CHARS, scrubber) if description_raw else ""
    )
    detail = f": {shown_description}" if shown_description else ""
    if rules.throttle is not None and rules.throttle.matches(raw_code, description):
        # A documented refusal, not a judgement on the grant: nothing was issued or spent.
        wait = retry_after if retry_after is not None else rules.throttle.retry_after_seconds
        return TemporarilyUnavailable(
            f"token endpoint throttled the request (HTTP {status}, error {shown_code!r}){detail}",
            status=status,
            retry_after=float(wait),
            ambiguous=False,
        )
    # A 2xx with an error body contradicts itself: the request was processed, and a rotating
    # refresh token may be spent -- unless the error refuses the grant or the client outright
    # and no new token came with it (a provider that rotated says so with the new token;
    # Zoho answers its refusals with HTTP 200). Keep whatever refresh token it carried.
    success = 200 <= status < 300
    code = rules.error_aliases.get(raw_code, raw_code)
    cls = OAUTH_ERRORS.get(code) or rules.grant_errors.get(code)
    carried = _carried_refresh_token(data) if success else None
    refusal = cls is None or not cls.default_retryable
    ambiguity: dict[str, Any] = {
        "ambiguous": success and (carried is not None or not refusal),
        "refresh_token": carried,
    }
    if cls is None:
        return UnknownProviderError(
            f"token endpoint answered error {shown_code!r} (HTTP {status}){detail}",
            status=status,
            retry_after=retry_after,
            **ambiguity,
        )
    return cls(
        f"token endpoint answered {code} (HTTP {status}){detail}",
        status=status,
        retry_after=retry_after,
        **ambiguity,
    )


def parse_token_response(
    response: HttpResponse,
    *,
    error_aliases: Mapping[str, str] | None = None,
    rules: AnswerRules | None = None,
    known_secrets: Iterable[Secret | None] = (),
    now: datetime | None = None,
) -> TokenResponse:
    """A usable :class:`TokenResponse`, or the :class:`ProviderError` that describes why not.

    ``rules`` are the profile's (``error_aliases`` alone is a shorthand for rules with only
    those); ``known_secrets`` every secret of the exchange (what was sent, what is stored),
    scrubbed from the provider's text by value; ``now`` is when the answer arrived, for a
    JWT's ``exp``.

    A ``refresh_token`` field that is present but unusable (empty, blank, not ``1*VSCHAR``)
    is RFC 6749 §6's "the server issued a new refresh token" with no token to keep. With a
    rotating provider the old one may already be retired, so the answer is an ambiguous
    :class:`MalformedResponse` (the outcome of the refresh is unknown). With a provider whose
    refresh tokens outlive their use, the old one still works: the answer is used and the
    oddity reported in :attr:`TokenResponse.warnings`.
    """
    if rules is None:
        rules = AnswerRules(error_aliases=dict(error_aliases or {}))
    data, scrubber = answer_object(response, rules=rules, known_secrets=known_secrets, now=now)
    return _token_from_body(data, response.status, rules, scrubber, now or datetime.now(UTC))


def answer_object(
    response: HttpResponse,
    *,
    rules: AnswerRules,
    known_secrets: Iterable[Secret | None] = (),
    now: datetime | None = None,
) -> tuple[dict[str, Any], Scrubber]:
    """The JSON object of a successful answer from an endpoint that answers like RFC 6749's
    token endpoint (§5.1, §5.2: the device authorization endpoint too, RFC 8628 §3.2), with
    the scrubber for its text; any other answer raised as its classified
    :class:`ProviderError` (see :func:`parse_token_response`)."""
    status = response.status
    retry_after = parse_retry_after(response.headers.get("retry-after"), now)
    data = _json_object(response.body)
    scrubber = Scrubber(known_secrets).including(_answer_secrets(data))

    if 200 <= status < 300:
        if data is None:
            raise MalformedResponse(
                f"token endpoint answered HTTP {status} without a JSON object", status=status
            )
        if data.get("error"):
            # Some providers (Zoho) report failures with HTTP 200. Never store these.
            raise _error_from_body(data, status, retry_after, rules, scrubber)
        return data, scrubber

    if data is not None and data.get("error"):
        error = _error_from_body(data, status, retry_after, rules, scrubber)
        if (status >= 500 or status == 429) and not error.retryable:
            # Whatever code it carries, a 5xx/429 is the server's trouble, not the grant's.
            transient = TemporarilyUnavailable if status in (429, 503) else ProviderServerError
            raise transient(error.message, status=status, retry_after=retry_after)
        raise error
    if status in (429, 503):
        raise TemporarilyUnavailable(
            f"token endpoint answered HTTP {status}", status=status, retry_after=retry_after
        )
    if status >= 500 or status == 408:
        # Without an OAuth error body a 5xx may come from a gateway that gave up while the
        # server went on (502, 504): the grant may be spent. 408: it never got the request.
        raise ProviderServerError(
            f"token endpoint answered HTTP {status}",
            status=status,
            retry_after=retry_after,
            ambiguous=status >= 500 and status not in _UNHANDLED_5XX,
        )
    if status == 401:
        raise InvalidClient("token endpoint answered HTTP 401 without an error body", status=401)
    raise UnknownProviderError(
        f"token endpoint answered HTTP {status} without an OAuth error body", status=status
    )


def _token_from_body(
    data: Mapping[str, Any],
    status: int,
    rules: AnswerRules,
    scrubber: Scrubber,
    now: datetime,
) -> TokenResponse:
    warnings: list[str] = []
    refresh_token = _issued_refresh_token(data, status, rules, warnings)

    def malformed(reason: str) -> MalformedResponse:
        return MalformedResponse(
            f"token endpoint answered HTTP {status} {reason}",
            status=status,
            refresh_token=refresh_token,
        )

    access_token = data.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise malformed("without an access_token")
    if not _usable_token(access_token):
        raise malformed("with an unusable access_token (not 1*VSCHAR, RFC 6749 Appendix A.12)")
    token_type = data.get("token_type") or "Bearer"
    if not isinstance(token_type, str):
        raise malformed("with a token_type that is not a string")
    if not _TOKEN_TYPE.fullmatch(token_type):
        raise malformed("with a token_type that is not an HTTP auth-scheme")

    expires_in = _stated_lifetime(data.get("expires_in"), malformed)
    if expires_in is None and data.get("expires_in") is not None:
        warnings.append(f"expires_in beyond {MAX_LIFETIME_SECONDS} s not believed")
    lifetime, source = _lifetime(expires_in, access_token, rules, now)

    scope_raw = data.get("scope")
    scope = (
        tuple(scrubber(s) for s in scope_raw.split())
        if isinstance(scope_raw, str) and len(scope_raw) <= _MAX_TEXT_CHARS
        else None
    )
    extras = {
        k: scrubber(v)
        for k in _KEPT_EXTRAS
        if isinstance(v := data.get(k), str) and len(v) <= _MAX_TEXT_CHARS
    }
    return TokenResponse(
        access_token=Secret(access_token),
        token_type=token_type,
        expires_in=expires_in,
        refresh_token=refresh_token,
        scope=scope,
        extras=extras,
        lifetime_seconds=lifetime,
        lifetime_source=source,
        warnings=tuple(warnings),
    )


def _issued_refresh_token(
    data: Mapping[str, Any], status: int, rules: AnswerRules, warnings: list[str]
) -> Secret | None:
    """The new refresh token, ``None`` when none was issued; see :func:`parse_token_response`
    for one that is present but unusable."""
    raw = data.get("refresh_token")
    if raw is None:
        return None  # RFC 6749 §6: the server MAY issue a new one; the old one stays.
    if isinstance(raw, str) and _usable_token(raw):
        return Secret(raw)  # exactly as issued: the server compares it byte for byte
    if rules.rotates_refresh_tokens:
        raise MalformedResponse(
            f"token endpoint answered HTTP {status} with an unusable refresh_token (not "
            "1*VSCHAR, RFC 6749 Appendix A.17); the refresh token used may be spent",
            status=status,
        )
    warnings.append("unusable refresh_token ignored; the stored one is kept")
    return None


def _lifetime(
    expires_in: int | None, access_token: str, rules: AnswerRules, now: datetime
) -> tuple[int, LifetimeSource]:
    if expires_in is not None:
        return expires_in, LifetimeSource.EXPIRES_IN
    jwt_lifetime = _jwt_lifetime(access_token, now)
    if jwt_lifetime is not None:
        return jwt_lifetime, LifetimeSource.JWT_EXP
    return rules.default_lifetime_seconds, LifetimeSource.PROFILE_DEFAULT


def _stated_lifetime(raw: object, malformed: Callable[[str], MalformedResponse]) -> int | None:
    """``expires_in`` in whole seconds, ``None`` when absent or beyond belief, or raise.

    RFC 6749 §5.1: "the lifetime in seconds of the access token". A JSON number or a decimal
    string (some providers quote it). Zero, negative, NaN or not a number: the answer cannot
    be used (and is ambiguous: the refresh may have happened). More than
    :data:`MAX_LIFETIME_SECONDS` (``1e12``, ``Infinity``): not believed, so not stated -- the
    fallbacks are shorter, and nothing downstream computes a date past year 9999.
    """
    if raw is None:
        return None
    number: float | int
    if isinstance(raw, bool):
        raise malformed("with an expires_in that is not a number")
    if isinstance(raw, str):
        text = raw.strip()
        if not _DECIMAL.fullmatch(text):
            raise malformed("with an expires_in that is not a number")
        number = float(text)
    elif isinstance(raw, int | float):
        number = raw
    else:
        raise malformed("with an expires_in that is not a number")
    if isinstance(number, float) and math.isnan(number):
        raise malformed("with an expires_in that is not a number")
    if number > MAX_LIFETIME_SECONDS:
        return None
    if number < 1:
        raise malformed("with an expires_in that is not positive")
    return int(number)


def _jwt_lifetime(access_token: str, now: datetime) -> int | None:
    """Seconds until a JWT access token's ``exp`` (RFC 7519 §4.1.4), when it is one.

    Read without verifying the signature: the broker is the token's bearer, not its audience,
    and the value only schedules the next refresh. Bounded like ``expires_in``; an ``exp`` in
    the past (or our clock ahead) is not believed either.
    """
    exp = _jwt_exp(access_token)
    if exp is None:
        return None
    remaining = exp - now.timestamp()
    if not 1 <= remaining <= MAX_LIFETIME_SECONDS:
        return None
    return int(remaining)


def _jwt_exp(access_token: str) -> float | None:
    """The ``exp`` claim of a JWS compact serialisation (RFC 7515 §7.1), when it is a date."""
    parts = access_token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    if isinstance(exp, int) and abs(exp) > _MAX_EXACT_FLOAT:
        return None  # too large to be a date (and to become a float)
    return float(exp) if math.isfinite(exp) else None
