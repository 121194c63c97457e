"""Operators behind Identity-Aware Proxy: the signed ``x-goog-iap-jwt-assertion`` header.

IAP authenticates the user, checks their IAP role, and passes the request on with a JWT it
signed; the application verifies it "in case someone bypasses IAP"
(https://cloud.google.com/iap/docs/signed-headers-howto). The unsigned
``x-goog-authenticated-user-email`` header is never read: anyone who reaches the service
without IAP can forge it. What is checked, as that page lists:

* header: ``alg`` exactly ``ES256`` (RFC 8725 §3.1); ``kid`` one of the keys published at
  https://www.gstatic.com/iap/verify/public_key-jwk (fetched by us, cached per
  ``Cache-Control``, re-fetched for an unknown ``kid`` at most every 30 s); no header that
  would let the token choose its own key (``jku``, ``jwk``, ``x5u``, ``x5c``; RFC 8725 §3.10)
  and no ``crit``;
* payload: ``exp`` in the future and ``iat`` in the past, each with 30 s of skew, and a
  lifetime of at most 10 minutes plus twice the skew (IAP's documented maximum); ``aud`` the
  configured audience (``/projects/PROJECT_NUMBER/global/backendServices/SERVICE_ID`` behind a
  load balancer, ``/projects/PROJECT_NUMBER/locations/REGION/services/SERVICE`` for IAP on
  Cloud Run directly); ``iss`` exactly ``https://cloud.google.com/iap``; ``sub`` and
  ``email`` present.

Failures raise :class:`~tokenbroker.kernel.errors.InvalidCallerToken` with a fixed message
(nothing of the token in it); no keys at all: :class:`CredentialUnavailable` (retryable).
joserfc is imported on first use (cold start).
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from tokenbroker.issue.idtoken import FORBIDDEN_HEADERS, JwksDocument, urllib_fetch
from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import ConfigError, CredentialUnavailable, InvalidCallerToken
from tokenbroker.kernel.fields import ascii_lower
from tokenbroker.kernel.model import Caller
from tokenbroker.oauth.authorization import check_endpoint_url

IAP_ISSUER = "https://cloud.google.com/iap"
IAP_KEYS_URL = "https://www.gstatic.com/iap/verify/public_key-jwk"
IAP_HEADER = "x-goog-iap-jwt-assertion"
IAP_ALG = "ES256"
#: IAP's documented skew allowance and maximum lifetime (10 minutes + 2 x skew).
IAP_SKEW = 30.0
IAP_MAX_LIFETIME = 600.0 + 2 * IAP_SKEW
MAX_ASSERTION_BYTES = 4096
_REFETCH_UNKNOWN_KID = 30.0
_DEFAULT_MAX_AGE = 3600.0


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidCallerToken(f"malformed IAP assertion {what}") from None
    if not isinstance(value, dict):
        raise InvalidCallerToken(f"malformed IAP assertion {what}")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _ec_keys(body: bytes) -> dict[str, Any]:
    """The P-256 keys of a JWK set, by ``kid`` (public members only)."""
    from joserfc.jwk import ECKey  # noqa: PLC0415 - off the cold-start path

    document = json.loads(body)
    listed = document.get("keys") if isinstance(document, dict) else None
    keys: dict[str, Any] = {}
    for jwk in listed if isinstance(listed, list) else []:
        if isinstance(jwk, dict) and jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
            public = {k: jwk[k] for k in ("kty", "crv", "x", "y") if k in jwk}
            keys[str(jwk.get("kid"))] = ECKey.import_key(public)
    return keys


class IapVerifier:
    """Verifies IAP's signed header and returns the operator it vouches for."""

    def __init__(
        self,
        *,
        audience: Sequence[str],
        keys_url: str = IAP_KEYS_URL,
        clock: Clock | None = None,
        fetch: Callable[[str], JwksDocument] = urllib_fetch,
    ) -> None:
        audiences = tuple(a for a in audience if a)
        if not audiences:
            raise ConfigError("the IAP audience (TOKENBROKER_IAP_AUDIENCE) is required")
        self.audiences = frozenset(audiences)
        self.keys_url = check_endpoint_url(keys_url, "the IAP keys URL")
        self.clock: Clock = clock or SystemClock()
        self._fetch = fetch
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fresh_until = -math.inf
        self._fetched_at = -math.inf

    def verify_headers(self, headers: Mapping[str, str]) -> Caller:
        """The caller from a request's headers (case-insensitive ``Mapping``, as Flask's)."""
        return self.verify(headers.get(IAP_HEADER))

    def verify(self, assertion: str | None) -> Caller:
        if not assertion:
            raise InvalidCallerToken("missing IAP assertion (is the service behind IAP?)")
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise InvalidCallerToken("IAP assertion too large")
        parts = assertion.split(".")
        if len(parts) != 3 or not all(parts):
            raise InvalidCallerToken("malformed IAP assertion")
        header = _b64json(parts[0], "header")
        if header.get("alg") != IAP_ALG:
            raise InvalidCallerToken("IAP assertion alg not allowed: only ES256 is accepted")
        if any(name in header for name in FORBIDDEN_HEADERS):
            raise InvalidCallerToken("IAP assertion header parameter not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise InvalidCallerToken("IAP assertion has no usable kid")
        key = self._key(kid)
        from joserfc import errors, jws  # noqa: PLC0415 - off the cold-start path

        try:
            verified = jws.deserialize_compact(assertion, key, algorithms=[IAP_ALG])
        except (errors.JoseError, ValueError, TypeError):
            raise InvalidCallerToken("IAP assertion signature does not verify") from None
        try:
            claims = json.loads(verified.payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise InvalidCallerToken("malformed IAP assertion payload") from None
        if not isinstance(claims, dict):
            raise InvalidCallerToken("malformed IAP assertion payload")
        return self._claims(claims)

    def _claims(self, claims: Mapping[str, Any]) -> Caller:
        now = self.clock.now().timestamp()
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if exp is None or iat is None:
            raise InvalidCallerToken("IAP assertion has no numeric exp or iat")
        if now >= exp + IAP_SKEW:
            raise InvalidCallerToken("IAP assertion expired")
        if iat > now + IAP_SKEW:
            raise InvalidCallerToken("IAP assertion issued in the future (iat)")
        if exp - iat > IAP_MAX_LIFETIME:
            raise InvalidCallerToken("IAP assertion lifetime exceeds IAP's maximum")
        if claims.get("iss") != IAP_ISSUER:
            raise InvalidCallerToken("IAP assertion iss is not IAP")
        aud = claims.get("aud")
        if not isinstance(aud, str) or aud not in self.audiences:
            raise InvalidCallerToken("IAP assertion aud does not match this service")
        sub, email = claims.get("sub"), claims.get("email")
        if not isinstance(sub, str) or not sub:
            raise InvalidCallerToken("IAP assertion has no sub")
        if not isinstance(email, str) or "@" not in email:
            raise InvalidCallerToken("IAP assertion has no email")
        return Caller(
            email=ascii_lower(email),
            subject=sub,
            issuer=IAP_ISSUER,
            expires_at=datetime.fromtimestamp(float(exp), UTC),
        )

    # -- keys ------------------------------------------------------------------------------

    def _key(self, kid: str) -> Any:
        with self._lock:
            now = time.monotonic()
            stale = now >= self._fresh_until
            unknown = kid not in self._keys
            if stale or (unknown and now - self._fetched_at >= _REFETCH_UNKNOWN_KID):
                self._refresh(now)
            key = self._keys.get(kid)
        if key is None:
            raise InvalidCallerToken("IAP assertion kid is not a published IAP key")
        return key

    def _refresh(self, now: float) -> None:
        self._fetched_at = now
        try:
            document = self._fetch(self.keys_url)
            keys = _ec_keys(document.body)
        except (OSError, ValueError, TypeError) as error:
            if self._keys:  # keep the last good keys for a while
                self._fresh_until = now + _REFETCH_UNKNOWN_KID
                return
            raise CredentialUnavailable(
                f"the IAP keys could not be fetched ({type(error).__name__}); try again"
            ) from None
        if not keys:
            raise CredentialUnavailable("the IAP keys URL lists no P-256 key; try again")
        self._keys = keys
        max_age = document.max_age if document.max_age is not None else _DEFAULT_MAX_AGE
        self._fresh_until = now + min(max(max_age, 60.0), 24 * 3600.0)


__all__ = ["IAP_HEADER", "IAP_ISSUER", "IAP_KEYS_URL", "IapVerifier"]
