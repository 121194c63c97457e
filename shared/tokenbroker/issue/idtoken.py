"""Caller authentication: a Google-signed ID token presented as a Bearer token.

Callers of the token issuer are Google service accounts. Each one fetches an ID token whose
``aud`` is the issuer function's URL (Cloud Run functions service-to-service authentication,
https://cloud.google.com/functions/docs/securing/authenticating) and sends it as
``Authorization: Bearer <token>`` (RFC 6750 §2.1). The caller's identity is the token's
``email`` claim, which Google includes only when the caller asks for it: the metadata server's
``identity?format=full`` (what google-auth's ``fetch_id_token`` requests) or IAM Credentials
``generateIdToken`` with ``includeEmail: true``.

What is checked, following Google's "Verify the integrity of the ID token"
(https://developers.google.com/identity/sign-in/web/backend-auth#verify-the-integrity-of-the-id-token),
RFC 7519 §7.2 (validating a JWT) and RFC 8725 (JWT Best Current Practices):

1. **Size first.** The compact token is capped (default 4 KiB) and the decoded JOSE header at
   1 KiB before anything is decoded, so a hostile header cannot make us parse megabytes.
2. **Shape.** Exactly three base64url segments (JWS compact serialisation, RFC 7515 §7.1),
   checked here before any decoding, then decoded by joserfc's strict base64url (no padding,
   canonical encodings only: RFC 4648 §3.5, so a token has one spelling); header and payload
   are JSON objects (RFC 7519 §7.2). The header is read by our own JSON decoder before
   joserfc sees the token, because joserfc's ``json.loads`` would take what we refuse: a
   header with duplicate member names (RFC 7515 §5.2), UTF-16/32 or a BOM. A duplicate claim
   resolves to the lexically last one, as RFC 7519 §4 permits. ``NaN``/``Infinity`` are not
   JSON.
3. **Algorithm allow-list.** ``alg`` must be exactly ``RS256`` (RFC 8725 §3.1, §3.2): ``none``,
   HMAC (the "public key as HMAC secret" confusion), other RSA hashes and EC algorithms are all
   refused, whatever key the ``kid`` names.
4. **Keys only from configuration.** ``jku``, ``x5u``, ``jwk`` and ``x5c`` headers are refused
   outright, never followed (RFC 8725 §3.10: do not let the token choose its verification key);
   ``crit`` is refused because we implement no extensions (RFC 7515 §4.1.11). A ``typ`` other
   than ``JWT`` is refused (RFC 8725 §3.11 explicit typing), so an ``at+jwt`` access token from
   the same issuer cannot pass as an ID token. Then joserfc's header registry checks the
   types of the registered parameters (``cty``, ``x5t``, ... are strings); parameters nobody
   registered are ignored, as RFC 7515 §4 says (joserfc's default registry would refuse
   them).
5. **Signature**, as the identity mode (:class:`IdentityMode`) says. ``verify``: joserfc's
   ``jws.deserialize_compact`` with an RS256-only registry and the key whose ``kid`` the
   header names, from the issuer's published JWK set (Google:
   https://www.googleapis.com/oauth2/v3/certs; read by joserfc's ``RSAKey.import_key``,
   RSA signing keys of at least 2048 bits only, :func:`parse_jwks`), cached per
   ``Cache-Control``, fetched off the event loop by :meth:`IdTokenVerifier.averify`.
   ``platform``: Cloud Run's IAM front end verified it and replaced the signature with
   :data:`SIGNATURE_REMOVED`, which is the only signature accepted; the token is parsed,
   not verified, by joserfc's ``jws.extract_compact``; :func:`credential_header` says which
   request header that token is in
   (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token).
6. **Claims** (RFC 7519 §4.1, OpenID Connect Core §3.1.3.7): ``iss`` is one of the configured
   issuers (exact match), ``aud`` is or contains one of the configured audiences (every URL of
   the function), ``exp`` is in the
   future and ``iat`` not in the future (both within a small leeway), ``nbf`` if present has
   passed, the lifetime ``exp - iat`` is plausible (Google's are one hour), ``sub`` and
   ``email`` are present and ``email_verified`` is true. These checks are ours, on claims
   our decoder read from joserfc's verified payload, not joserfc's ``jwt.decode`` and
   ``JWTClaimsRegistry``: that reads claims with plain ``json.loads`` by default and has
   neither our Google-specific rules (``email_verified`` as the string ``"true"``, a maximum
   lifetime) nor our messages.

Every failure raises :class:`~.errors.InvalidCallerToken` (HTTP 401 ``invalid_token``) with
a fixed message naming the check -- joserfc's errors included, which are mapped, never passed
on; no message contains the token or a value taken from it (the one exception: an ``alg``
that is a registered JWA name, e.g. ``'none'``). When no signing keys can be had at all the
error is
:class:`~.errors.CredentialUnavailable` (503, retryable): the caller's token may be
perfectly good and it should try again, not conclude it is forged.

Verification is the issuer's hot path (``bench/idtoken_verify.py``, docs/benchmarks.md). The
JWK set is parsed once per fetch and kept as joserfc ``RSAKey`` objects; joserfc parses the
compact JWS and checks the signature, and the rules above that are ours stay ours: the cheap
shape and size checks run before joserfc sees the token, so hostile input is refused without
it, and our claim checks and messages follow it. A full verification costs joserfc's ~13 us
over the bare RSA verify (its extract, header registry, key checks and second header decode):
~0.7x the rate of the hand-written parser this replaced and ~1.0x joserfc's own ``jwt.decode``
plus claims registry, i.e. ~0.35-0.4x the bare RSA verify rate on a busy 2-core machine.
What keeps the per-request cost negligible is below, and joserfc is not on it: accepted
headers are remembered by their encoded bytes (Google's differ only by ``kid``), and tokens
that verified are remembered by SHA-256 of the whole token (never the signature alone, and
never the token itself) in a bounded LRU until ``exp`` plus leeway, so a caller re-presenting
its token (they reuse one for up to an hour) costs a hash and a dict lookup, ~18x faster than
a full verification and as fast as before the move; ``exp`` is re-checked on every hit and an
entry dies with its signing key. joserfc is imported on first use, not with this module (cold
start), and :meth:`IdTokenVerifier.averify` does that import in a worker thread.
"""

from __future__ import annotations

import hashlib
import http.client
import ipaddress
import json
import math
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import ConfigError, CredentialUnavailable, InvalidCallerToken
from tokenbroker.kernel.fields import ascii_lower
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import Caller

if TYPE_CHECKING:  # joserfc itself is imported on first use, off the cold-start path
    from joserfc.jwk import RSAKey
    from joserfc.jws import JWSRegistry

#: Google's two spellings of its ID token issuer (google-auth ``id_token._GOOGLE_ISSUERS``).
GOOGLE_ISSUERS: tuple[str, ...] = ("https://accounts.google.com", "accounts.google.com")
#: Google's signing keys in JWK set form (the v1 URL serves PEM certificates instead).
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v3/certs"

#: The only JWS algorithm accepted (RFC 8725 §3.1: an explicit allow-list of one).
ALLOWED_ALG = "RS256"
#: Header parameters refused on sight. Key-carrying ones would let the token pick the key that
#: verifies it (RFC 8725 §3.10); ``crit`` names extensions we do not implement (RFC 7515
#: §4.1.11); ``b64`` (RFC 7797) and ``zip`` (JWE only) change how the payload is read.
FORBIDDEN_HEADERS: tuple[str, ...] = ("crit", "jku", "jwk", "x5u", "x5c", "b64", "zip")
#: JWA names (RFC 7518 §3.1) we may repeat in a message; anything else is not echoed.
_KNOWN_ALGS = frozenset(
    {"none", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512"}
    | {"PS256", "PS384", "PS512", "EdDSA", "ES256K", "Ed25519", "Ed448"}
)

DEFAULT_MAX_TOKEN_BYTES = 4096
MAX_HEADER_BYTES = 1024
MAX_KID_CHARS = 256
DEFAULT_LEEWAY = 60.0
DEFAULT_MAX_LIFETIME = 2 * 3600.0
DEFAULT_CACHE_SIZE = 10_000
DEFAULT_REFETCH_INTERVAL = 300.0
DEFAULT_MAX_AGE = 3600.0
MIN_MAX_AGE = 60.0
MAX_MAX_AGE = 24 * 3600.0
DEFAULT_FAILURE_BACKOFF = 10.0
DEFAULT_FETCH_TIMEOUT = 5.0
DEFAULT_MAX_JWKS_BYTES = 256 * 1024
MIN_RSA_BITS = 2048  # RFC 7518 §3.3

#: The JWK members handed to joserfc: the public ones and those that restrict the key's use.
_JWK_MEMBERS = ("kty", "kid", "n", "e", "use", "alg", "key_ops")
# What a compact JWS may contain (RFC 7515 §7.1: base64url segments joined by dots). Checked by
# deleting these bytes and looking at what is left: ~3x faster than a regex on this path.
_JWS_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
#: Accepted headers remembered by their encoded bytes (Google's differ only by kid).
_HEADER_CACHE_SIZE = 64
# Base64url characters needed for MAX_HEADER_BYTES decoded bytes.
_MAX_HEADER_B64 = (MAX_HEADER_BYTES * 4 + 2) // 3
_MAX_AGE_RE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})\"?", re.IGNORECASE)
_LOOPBACK_HOSTS = frozenset({"localhost"})


# ---------------------------------------------------------------------------------------------
# Fetching and parsing the issuer's JWK set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JwksDocument:
    """One answer from the keys URL: the raw body and how long it may be cached (seconds)."""

    body: bytes
    max_age: float | None = None


class KeysDocumentError(ValueError):
    """The keys URL answered with something that is not a usable JWK set."""


class KeysFetchNeeded(Exception):
    """:meth:`KeySet.lookup` cannot answer without fetching the keys URL (blocking I/O)."""

    def __init__(self, kid: str) -> None:
        super().__init__("the keys URL must be fetched")
        self.kid = kid


#: Fetches a keys URL. Raises ``OSError`` (``urllib.error.URLError`` is one), ``ValueError``
#: or ``http.client.HTTPException`` when no usable answer came.
Fetch = Callable[[str], JwksDocument]


def parse_max_age(cache_control: str | None) -> float | None:
    """The ``max-age`` directive of a ``Cache-Control`` value (RFC 9111 §5.2.2.1), if any.

    Google's certs answer carries one (``public, max-age=19967, must-revalidate, ...``) and
    rotates keys well inside it; ``no-store`` and ``no-cache`` yield 0 (clamped by the caller).
    """
    if not cache_control:
        return None
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    match = _MAX_AGE_RE.search(cache_control)
    return float(match.group(1)) if match else None


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Keys come from the configured URL only: a redirect (possibly to plain HTTP) is an error."""

    def redirect_request(self, *_: Any, **__: Any) -> None:
        return None


def urllib_fetch(
    url: str,
    *,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
) -> JwksDocument:
    """GET ``url`` with the standard library: bounded time, bounded body, no redirects."""
    opener = urllib.request.build_opener(_RefuseRedirects())
    request = urllib.request.Request(  # noqa: S310 - KeySet allows only https (or loopback http)
        url, headers={"Accept": "application/json", "User-Agent": "tokenbroker-idtoken/1"}
    )
    with opener.open(request, timeout=timeout) as response:
        status = getattr(response, "status", 200)
        if status != 200:
            raise OSError(f"keys URL answered HTTP {status}")
        body = response.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise KeysDocumentError(f"keys document larger than {max_bytes} bytes")
        return JwksDocument(body, parse_max_age(response.headers.get("Cache-Control")))


def parse_jwks(
    body: bytes,
    *,
    previous: Mapping[str, RSAKey] | None = None,
    min_bits: int = MIN_RSA_BITS,
    max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
) -> dict[str, RSAKey]:
    """The RS256 verification keys of a JWK set (RFC 7517 §5), by ``kid``, as joserfc keys.

    Kept: ``kty`` RSA with ``use`` ``sig`` or unset, ``alg`` RS256 or unset, ``key_ops`` unset
    or containing ``verify``, a ``kid``, and a modulus of at least ``min_bits`` (RFC 7518 §3.3).
    Anything else is skipped, so one odd key does not take the others down -- which is why each
    entry goes through joserfc's ``RSAKey.import_key`` on its own rather than the whole
    document through ``KeySet.import_key_set``: that one raises on the first entry it cannot
    read and would also take EC and symmetric keys. Only the public members (``n``, ``e``) and
    ``kid``/``use``/``alg``/``key_ops`` are handed over, so a published private key is read
    as its public half, and joserfc's own parameter rules (``use`` and ``key_ops`` agree,
    registered operations only) apply on top of ours; at verification joserfc checks the
    key's ``use``/``alg``/``key_ops`` again. A key identical to one in ``previous`` keeps that
    object, so identity comparison tells whether a cached verification's key is still
    published. The first of duplicate kids wins. joserfc is imported here, off the cold-start
    path. Raises :class:`KeysDocumentError` when the body is larger than ``max_bytes`` (a
    custom ``fetch`` may not bound it), is not a JWK set, or holds no usable key.
    """
    from joserfc.errors import JoseError  # noqa: PLC0415 - off the cold-start path
    from joserfc.jwk import RSAKey  # noqa: PLC0415

    if len(body) > max_bytes:
        raise KeysDocumentError(f"keys document larger than {max_bytes} bytes")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise KeysDocumentError("keys document is not JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysDocumentError("keys document is not a JWK set")
    keys: dict[str, RSAKey] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") != "RSA":
            continue
        kid = entry.get("kid")
        key_ops = entry.get("key_ops")
        if (
            not isinstance(kid, str)
            or not kid
            or kid in keys
            or entry.get("use", "sig") != "sig"
            or entry.get("alg", ALLOWED_ALG) != ALLOWED_ALG
            or (key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops))
        ):
            continue
        modulus = entry.get("n")
        if not isinstance(modulus, str) or len(modulus) * 6 < min_bits - 6:
            continue  # too short to be big enough (checked exactly below)
        fields = {name: entry[name] for name in _JWK_MEMBERS if name in entry}
        try:
            imported = RSAKey.import_key(fields)
        except (ValueError, TypeError, JoseError):
            continue
        if imported.public_key.key_size < min_bits:
            continue
        old = (previous or {}).get(kid)
        keys[kid] = old if old is not None and _same_key(old, imported) else imported
    if not keys:
        raise KeysDocumentError("keys document holds no usable RS256 key")
    return keys


def _same_key(old: RSAKey, new: RSAKey) -> bool:
    return old.public_key.public_numbers() == new.public_key.public_numbers() and all(
        old.get(name) == new.get(name) for name in ("use", "alg", "key_ops")
    )


def _check_keys_url(url: str) -> None:
    """Keys must come over HTTPS; plain HTTP only to this machine (local oidc-provider)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and host:
        if host in _LOOPBACK_HOSTS:
            return
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
    raise ConfigError(
        "ID token keys URL must be https:// (plain http:// only for localhost/127.0.0.1)"
    )


class KeySet:
    """The issuer's RS256 signing keys, fetched from ``url`` and cached.

    * Fetched on first use, then kept for the answer's ``Cache-Control: max-age`` (clamped to
      1 min .. 24 h; ``max_age`` when absent), as Google's docs ask; refreshed on the first
      use after that.
    * A ``kid`` not in the set triggers one refetch (keys rotated since we fetched), but at
      most one such refetch per ``refetch_interval`` seconds, so tokens with made-up ``kid``
      values cannot turn the issuer into a traffic generator against the keys URL.
    * A failed fetch keeps serving the keys we have (logged) and is not retried for
      ``failure_backoff`` seconds. With no keys at all, :meth:`key_for` raises
      :class:`~.errors.CredentialUnavailable` (503, retryable).
    * Thread-safe: readers use an immutable snapshot; one thread fetches at a time, and while
      a stale set is being refreshed other threads keep using it instead of waiting.

    ``fetch`` replaces the HTTP GET (unit tests pass a fake); times come from ``clock``.
    """

    def __init__(
        self,
        url: str = GOOGLE_CERTS_URL,
        *,
        fetch: Fetch | None = None,
        clock: Clock | None = None,
        refetch_interval: float = DEFAULT_REFETCH_INTERVAL,
        max_age: float = DEFAULT_MAX_AGE,
        failure_backoff: float = DEFAULT_FAILURE_BACKOFF,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        min_key_bits: int = MIN_RSA_BITS,
    ) -> None:
        _check_keys_url(url)
        if refetch_interval < 0 or max_age <= 0 or failure_backoff < 0 or timeout <= 0:
            raise ConfigError("KeySet intervals must be positive")
        self.url = url
        self.refetch_interval = refetch_interval
        self.max_age = max_age
        self.failure_backoff = failure_backoff
        self.min_key_bits = min_key_bits
        self.max_body_bytes = max_body_bytes
        self._fetch: Fetch = fetch or partial(
            urllib_fetch, timeout=timeout, max_bytes=max_body_bytes
        )
        self._clock: Clock = clock or SystemClock()
        self._keys: Mapping[str, RSAKey] = {}  # replaced whole, never mutated
        self._fresh_until = -math.inf
        self._retry_at = -math.inf  # after a failed fetch
        self._kid_refetch_at = -math.inf  # last refetch caused by an unknown kid
        self._lock = threading.Lock()
        #: Fetch attempts and failures so far (for tests, benchmarks and metrics).
        self.fetches = 0
        self.failures = 0
        self._log = get_logger(component="idtoken-keys")

    @property
    def kids(self) -> frozenset[str]:
        """The key ids held now (no fetch)."""
        return frozenset(self._keys)

    def peek(self, kid: str) -> RSAKey | None:
        """The key held for ``kid`` now, without fetching."""
        return self._keys.get(kid)

    def key_for(self, kid: str) -> RSAKey:
        """The verification key named ``kid``; fetches as described on the class."""
        now = self._clock.monotonic()
        if now >= self._fresh_until and now >= self._retry_at:
            self._refresh_stale()
        key = self._keys.get(kid)
        if key is not None:
            return key
        return self._refetch_for(kid)

    def lookup(self, kid: str) -> RSAKey:
        """The key named ``kid`` without any I/O, for code on an event loop.

        Raises :class:`KeysFetchNeeded` exactly where :meth:`key_for` would fetch (the set is
        stale with no refresh under way, or the ``kid`` is unknown and the refetch rate limit
        allows one): the caller then runs :meth:`key_for` in a thread. Everything else --
        the key, an unknown ``kid`` inside the rate limit, no keys at all during a failure
        backoff -- is answered here, at once, as :meth:`key_for` answers it.
        """
        now = self._clock.monotonic()
        # Stale: fetch, unless another thread is refreshing and we have keys to go on with
        # (what key_for does, without blocking on its lock).
        stale = now >= self._fresh_until and now >= self._retry_at
        if stale and (not self._keys or not self._lock.locked()):
            raise KeysFetchNeeded(kid)
        key = self._keys.get(kid)
        if key is not None:
            return key
        if now - self._kid_refetch_at >= self.refetch_interval and now >= self._retry_at:
            raise KeysFetchNeeded(kid)
        if not self._keys:
            raise self._unavailable(now)
        raise InvalidCallerToken("token signed with an unknown key (kid)")

    def refresh(self) -> bool:
        """Fetch now (e.g. at cold start, off the event loop). True when keys were loaded."""
        with self._lock:
            return self._fetch_locked(self._clock.monotonic(), "refresh")

    # -- internals -----------------------------------------------------------------------------

    def _refresh_stale(self) -> None:
        if self._keys:
            # Others keep verifying with the current keys while one thread refreshes them.
            if not self._lock.acquire(blocking=False):
                return
        else:
            self._lock.acquire()
        try:
            now = self._clock.monotonic()
            if now >= self._fresh_until and now >= self._retry_at:
                self._fetch_locked(now, "stale" if self._keys else "initial")
            if not self._keys:
                raise self._unavailable(now)
        finally:
            self._lock.release()

    def _refetch_for(self, kid: str) -> RSAKey:
        with self._lock:
            key = self._keys.get(kid)
            if key is not None:  # another thread's refetch brought it in
                return key
            now = self._clock.monotonic()
            if now - self._kid_refetch_at >= self.refetch_interval and now >= self._retry_at:
                self._kid_refetch_at = now
                self._fetch_locked(now, "unknown kid")
                key = self._keys.get(kid)
                if key is not None:
                    return key
            if not self._keys:
                raise self._unavailable(now)
        raise InvalidCallerToken("token signed with an unknown key (kid)")

    def _unavailable(self, now: float) -> CredentialUnavailable:
        wait = max(1.0, self._retry_at - now) if math.isfinite(self._retry_at) else 1.0
        return CredentialUnavailable(
            "ID token signing keys are unavailable; try again", retry_after=wait
        )

    def _fetch_locked(self, now: float, reason: str) -> bool:
        self.fetches += 1
        try:
            document = self._fetch(self.url)
            keys = parse_jwks(
                document.body,
                previous=self._keys,
                min_bits=self.min_key_bits,
                max_bytes=self.max_body_bytes,
            )
        except (OSError, ValueError, http.client.HTTPException) as exc:
            self.failures += 1
            self._retry_at = now + self.failure_backoff
            self._log.warning(
                "ID token keys fetch failed; keeping the keys we have",
                url=self.url,
                reason=reason,
                error=type(exc).__name__,
                detail=str(exc)[:200],
                kept_keys=len(self._keys),
            )
            return False
        ttl = self.max_age if document.max_age is None else document.max_age
        self._keys = keys
        self._fresh_until = now + min(max(ttl, MIN_MAX_AGE), MAX_MAX_AGE)
        self._retry_at = -math.inf
        self._log.info(
            "ID token keys fetched", url=self.url, reason=reason, kids=sorted(keys), ttl=ttl
        )
        return True


# ---------------------------------------------------------------------------------------------
# Where the caller's token is: the two identity modes
# ---------------------------------------------------------------------------------------------


class IdentityMode(StrEnum):
    """Who verifies the caller's ID token signature (docs/issuer.md, *Caller identity*).

    * ``platform``: Cloud Run's IAM front end (the service requires ``run.invoker``; no
      public invocation). It passes the token on with the signature replaced by
      :data:`SIGNATURE_REMOVED`; the issuer checks every claim but not the signature.
    * ``verify``: the issuer, against the issuer's published keys (public invocation, or
      invoker IAM with the invoker token in ``X-Serverless-Authorization``).
    """

    PLATFORM = "platform"
    VERIFY = "verify"


#: What Cloud Run puts in place of the signature of the token it verified
#: (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token).
SIGNATURE_REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"
_SIGNATURE_REMOVED = SIGNATURE_REMOVED.encode()
AUTHORIZATION = b"authorization"
SERVERLESS_AUTHORIZATION = b"x-serverless-authorization"


def credential_header(mode: IdentityMode, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The value of the one request header the caller is taken from, or ``None``.

    ``headers`` are the request's (name, value) pairs as ASGI gives them; names are compared
    case-insensitively (RFC 9110 §5.1).

    Cloud Run checks ``X-Serverless-Authorization`` when it is present, else
    ``Authorization``, and strips the signature of the token it checked; the other header
    reaches the container as the caller sent it
    (https://cloud.google.com/run/docs/authenticating/service-to-service#acquire-token;
    confirmed by Cloud Run's product manager in
    https://github.com/GoogleCloudPlatform/cloud-run-proxy/pull/25). Hence:

    * ``platform``: ``X-Serverless-Authorization`` whenever it is present (even empty: no
      falling back to ``Authorization``, which Cloud Run did not check then), else
      ``Authorization``. A token in the header the platform did not check is never read, so
      a forged unsigned one next to a real ``X-Serverless-Authorization`` is inert.
    * ``verify``: ``Authorization``, whose signature the issuer verifies.
      ``X-Serverless-Authorization`` is the platform's business and is ignored.

    The header read must appear once: two of them (which did the front end check?) is a 401.
    """
    authorization: list[bytes] = []
    serverless: list[bytes] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered == AUTHORIZATION:
            authorization.append(value)
        elif lowered == SERVERLESS_AUTHORIZATION:
            serverless.append(value)
    chosen = serverless if mode is IdentityMode.PLATFORM and serverless else authorization
    if not chosen:
        return None
    if len(chosen) > 1:
        raise InvalidCallerToken("more than one credential header of the same name")
    return chosen[0].decode("latin-1")


def _bearer_token(header: str | None) -> str:
    if not isinstance(header, str):
        raise InvalidCallerToken("missing bearer token")
    scheme, _, credentials = header.strip().partition(" ")
    token = credentials.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidCallerToken("missing bearer token")
    return token


# ---------------------------------------------------------------------------------------------
# The verifier
# ---------------------------------------------------------------------------------------------


class _Verified(NamedTuple):
    caller: Caller
    expires: float  # exp + leeway, epoch seconds
    kid: str
    #: The key that verified the signature; ``None`` when the platform did (platform mode).
    key: RSAKey | None


#: A verification the verifier made and holds (:meth:`CallerVerifier.receipt`).
Receipt = _Verified


#: Looks a verification key up by ``kid``: :meth:`KeySet.key_for` (may fetch) or
#: :meth:`KeySet.lookup` (never does I/O; raises :class:`KeysFetchNeeded`).
KeyLookup = Callable[[str], "RSAKey"]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _reject_constant(_: str) -> Any:
    raise ValueError("NaN and Infinity are not JSON")


# Headers: duplicate names rejected (RFC 7515 §5.2). Claims: Python keeps the lexically last
# duplicate, which RFC 7519 §4 allows, and skipping the hook saves ~0.5 us per token. Neither
# accepts NaN or Infinity, which Python's json would otherwise turn into floats.
_header_decoder = json.JSONDecoder(
    object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
)
_claims_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _json_object(data: bytes, what: str, decoder: json.JSONDecoder) -> dict[str, Any]:
    """A JSON object from UTF-8 bytes, or ``malformed token <what>``.

    Our decoders, not joserfc's ``json.loads``: that one lets duplicate header members, NaN
    and UTF-16/32 through. Headers are read here before joserfc sees the token.
    """
    try:
        value = decoder.decode(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: nesting deeper than the interpreter's stack (issue 9: a 500 with a
        # traceback for an unauthenticated request).
        raise InvalidCallerToken(f"malformed token {what}") from None
    if not isinstance(value, dict):
        raise InvalidCallerToken(f"malformed token {what}")
    return value


class _Jose:
    """joserfc's compact JWS functions with the registry our rules need, built on first use.

    The registry allows RS256 only and, unlike joserfc's default, does not refuse header
    parameters it does not know (RFC 7515 §4: they are ignored unless listed in ``crit``,
    which we refuse); its size limits are set to ours, which are checked first, so they never
    decide. joserfc is imported here, not with the module (cold start).
    """

    def __init__(self, max_token_bytes: int) -> None:
        from joserfc import errors, jws  # noqa: PLC0415 - off the cold-start path
        from joserfc.util import urlsafe_b64decode  # noqa: PLC0415

        self.registry: JWSRegistry = jws.JWSRegistry(
            algorithms=[ALLOWED_ALG], strict_check_header=False
        )
        self.registry.max_header_length = _MAX_HEADER_B64
        self.registry.max_payload_length = max_token_bytes
        self.registry.max_signature_length = max_token_bytes
        self.deserialize_compact = jws.deserialize_compact
        self.extract_compact = jws.extract_compact
        #: Strict base64url (RFC 7515 §2): no padding, no ``+``/``/``, canonical last character.
        self.b64decode = urlsafe_b64decode
        self.error = errors.JoseError
        #: What joserfc raises when the signature (or the key's fitness for it) fails.
        self.bad_signature: tuple[type[Exception], ...] = (
            errors.BadSignatureError,
            errors.KeyParameterError,
            errors.InvalidKeyTypeError,
            errors.MissingKeyError,
        )
        self.decode_error = errors.DecodeError


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class IdTokenVerifier:
    """Verifies callers' Google-signed ID tokens (see the module docstring for every check).

    ``audience`` is the function's URL (what callers put in ``target_audience``); ``issuers``,
    ``keys`` / ``keys_url`` default to Google's and are configurable so tests and local runs can
    use oidc-provider as the issuer. ``cache_size`` bounds the verified-token cache (0 disables
    it); ``max_lifetime`` bounds ``exp - iat``.
    """

    def __init__(
        self,
        *,
        audience: str | Sequence[str],
        mode: IdentityMode = IdentityMode.VERIFY,
        issuers: Sequence[str] = GOOGLE_ISSUERS,
        keys: KeySet | None = None,
        keys_url: str = GOOGLE_CERTS_URL,
        clock: Clock | None = None,
        leeway: float = DEFAULT_LEEWAY,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        require_email_verified: bool = True,
        max_lifetime: float = DEFAULT_MAX_LIFETIME,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        audiences = (audience,) if isinstance(audience, str) else tuple(audience)
        if not audiences or not all(isinstance(a, str) and a.strip() for a in audiences):
            raise ConfigError("ID token audience (the function's URL) is required")
        issuer_list = (issuers,) if isinstance(issuers, str) else tuple(issuers)
        if not issuer_list or not all(isinstance(i, str) and i for i in issuer_list):
            raise ConfigError("at least one ID token issuer is required")
        if not 0 <= leeway <= 300:
            raise ConfigError("ID token leeway must be between 0 and 300 seconds")
        if max_token_bytes < 256:
            raise ConfigError("max_token_bytes must be at least 256")
        if max_lifetime <= 0 or cache_size < 0:
            raise ConfigError("max_lifetime must be positive and cache_size not negative")
        #: Every URL of the function (a gen2 function answers on two): ``aud`` must be one.
        self.audiences = frozenset(audiences)
        self.audience = audiences[0]
        self.mode = IdentityMode(mode)
        self.issuers = frozenset(issuer_list)
        self.clock: Clock = clock or SystemClock()
        self.keys = keys if keys is not None else KeySet(keys_url, clock=self.clock)
        self.leeway = float(leeway)
        self.max_token_bytes = max_token_bytes
        self.require_email_verified = require_email_verified
        self.max_lifetime = float(max_lifetime)
        self.cache_size = cache_size
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._headers: dict[bytes, str] = {}  # accepted encoded header -> its kid
        self._jose: _Jose | None = None  # joserfc, on the first token that needs it
        #: Verified-token cache hits so far.
        self.cache_hits = 0
        self._warned_signed_at = -math.inf

    # -- which header --------------------------------------------------------------------------

    def select_authorization(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The request header this verifier takes the caller from: :func:`credential_header`."""
        return credential_header(self.mode, headers)

    # -- verifying -----------------------------------------------------------------------------

    def verify_authorization(self, header: str | None) -> Caller:
        """The caller behind an ``Authorization`` header value (RFC 6750 §2.1).

        The scheme is case-insensitive (RFC 9110 §11.1); anything but ``Bearer <token>`` is
        ``missing bearer token``. Blocking when the keys must be fetched: on an event loop use
        :meth:`averify_authorization`.
        """
        return self.verify(_bearer_token(header))

    async def averify_authorization(self, header: str | None) -> Caller:
        """:meth:`verify_authorization` for an event loop: never blocks it (see :meth:`averify`)."""
        return await self.averify(_bearer_token(header))

    def verify(self, token: str) -> Caller:
        """The caller an ID token vouches for, or :class:`InvalidCallerToken` saying why not.

        :class:`~.errors.CredentialUnavailable` (503, retryable) when no signing
        keys could be fetched at all: the token may be fine, the caller should retry.
        """
        return self._verify(token, self.keys.key_for)

    async def averify(self, token: str) -> Caller:
        """:meth:`verify` without blocking the event loop (issue 9: one unknown ``kid``
        stalled every request, ``/healthz`` included, for the keys server's response time).

        The fast path -- a cached verification, or cached keys -- runs here, synchronously:
        it is CPU work of a few microseconds. Only when the keys URL must be fetched (stale
        keys, or an unknown ``kid`` inside the refetch rate limit, :meth:`KeySet.lookup`) does
        the fetch run in a worker thread (``asyncio.to_thread``), and the verification then
        finishes with the key it brought. The rate limit and the failure backoff are the
        :class:`KeySet`'s, so a burst of made-up ``kid`` values still costs one fetch and the
        rest are refused at once, without a thread each. joserfc's first import (tens of ms;
        :class:`_Jose`) happens in a worker thread too.
        """
        if self._jose is None:
            import asyncio  # noqa: PLC0415 - only the first call and the fetch path need it

            await asyncio.to_thread(self._load_jose)
        try:
            return self._verify(token, self.keys.lookup)
        except KeysFetchNeeded as need:
            kid = need.kid
        import asyncio  # noqa: PLC0415 - only the fetch path needs it

        key = await asyncio.to_thread(self.keys.key_for, kid)  # may raise: unknown kid, 503
        return self._verify(token, lambda _kid: key)

    def receipt(self, header: str | None) -> Receipt | None:
        """The verification of the token in ``header`` this verifier holds (one it just made),
        or ``None`` (not cached, or caching off). With :meth:`still_holds`, what lets a caller
        that sends the same header again skip parsing, hashing and looking the token up."""
        if not self.cache_size:
            return None
        try:
            raw = _bearer_token(header).encode("ascii")
        except (InvalidCallerToken, UnicodeEncodeError):
            return None
        return self._cache.get(hashlib.sha256(raw).digest())

    def still_holds(self, receipt: object, now: float) -> bool:
        """Whether a verification still stands at ``now`` (epoch seconds): the token has not
        expired and the key that verified it is still the one published under its ``kid``
        (the checks of a cache hit). ``False``: verify afresh."""
        return (
            type(receipt) is _Verified
            and now < receipt.expires
            and (receipt.key is None or self.keys.peek(receipt.kid) is receipt.key)
        )

    def _verify(self, token: str, lookup: KeyLookup) -> Caller:
        if not isinstance(token, str) or not token:
            raise InvalidCallerToken("missing bearer token")
        # Size before anything else. For ASCII (all that can pass) characters are bytes.
        if len(token) > self.max_token_bytes:
            raise InvalidCallerToken(f"token larger than {self.max_token_bytes} bytes")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError:
            raise InvalidCallerToken("malformed token: not base64url") from None
        now = self.clock.now().timestamp()
        digest = b""
        if self.cache_size:
            digest = hashlib.sha256(raw).digest()
            entry = self._cache.get(digest)
            if entry is not None:
                caller = self._cache_hit(digest, entry, now)
                if caller is not None:
                    return caller
        caller, entry = self._verify_uncached(raw, now, lookup)
        if self.cache_size:
            with self._cache_lock:
                self._cache[digest] = entry
                self._cache.move_to_end(digest)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return caller

    def _cache_hit(self, digest: bytes, entry: _Verified, now: float) -> Caller | None:
        """The cached caller, or None to verify afresh. Expiry is enforced here too."""
        if now >= entry.expires:
            with self._cache_lock:
                self._cache.pop(digest, None)
            raise InvalidCallerToken("token expired")
        if entry.key is not None and self.keys.peek(entry.kid) is not entry.key:
            # The key that verified it was withdrawn or replaced: verify afresh.
            with self._cache_lock:
                self._cache.pop(digest, None)
            return None
        with self._cache_lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
        self.cache_hits += 1
        return entry.caller

    def _verify_uncached(
        self, raw: bytes, now: float, lookup: KeyLookup
    ) -> tuple[Caller, _Verified]:
        # Cheap shape checks before anything is decoded, joserfc included.
        if raw.count(b".") != 2:
            raise InvalidCallerToken("malformed token: expected three dot-separated segments")
        header_b64, payload_b64, signature_b64 = raw.split(b".")
        # The signature may be empty so that an ``alg: none`` token fails on its alg, by name.
        if raw.translate(None, _JWS_ALPHABET) or not header_b64 or not payload_b64:
            raise InvalidCallerToken("malformed token: not base64url")
        if len(header_b64) > _MAX_HEADER_B64:
            raise InvalidCallerToken(f"token header larger than {MAX_HEADER_BYTES} bytes")
        jose = self._jose or self._load_jose()
        kid = self._headers.get(header_b64)
        if kid is None:
            kid = self._check_header(header_b64, jose)
            if len(self._headers) >= _HEADER_CACHE_SIZE:
                self._headers.clear()
            self._headers[header_b64] = kid
        payload, key = self._check_signature(raw, kid, signature_b64, lookup, jose)
        claims = _json_object(payload, "payload", _claims_decoder)
        caller, exp = self._check_claims(claims, now)
        return caller, _Verified(caller, exp + self.leeway, kid, key)

    def _load_jose(self) -> _Jose:
        self._jose = _Jose(self.max_token_bytes)
        return self._jose

    def _check_signature(
        self, raw: bytes, kid: str, signature_b64: bytes, lookup: KeyLookup, jose: _Jose
    ) -> tuple[bytes, RSAKey | None]:
        """The signature, as the mode wants it checked: the decoded payload, and the key that
        verified it if we did.

        ``platform``: Google's front end verified the token and replaced its signature with
        :data:`SIGNATURE_REMOVED`; exactly that is accepted, and nothing else. A token that
        still carries a signature did not pass the IAM check (the service is publicly
        invocable, or the token sits in a header Cloud Run did not check): it is refused
        rather than verified here, so a deployment that lost its invoker IAM fails loudly
        instead of running open to unsigned forgeries. The payload is decoded by joserfc's
        ``jws.extract_compact``, which parses without verifying.

        ``verify``: joserfc's ``jws.deserialize_compact`` verifies the signature with the
        issuer's published key (RS256 only, the key's ``use``/``alg``/``key_ops`` honoured).

        Every joserfc error becomes :class:`InvalidCallerToken` with a fixed message.
        """
        removed = signature_b64 == _SIGNATURE_REMOVED
        if self.mode is IdentityMode.PLATFORM:
            if not removed:
                self._warn_signed_in_platform_mode()
                raise InvalidCallerToken(
                    "token was not verified by the platform: in platform mode only a token "
                    "whose signature Cloud Run's IAM check removed is accepted"
                )
            key = None
        elif removed:
            raise InvalidCallerToken(
                "token signature was removed by Google's front end; this issuer verifies "
                "signatures itself: send a signed token in Authorization and the invoker token "
                "in X-Serverless-Authorization"
            )
        else:
            key = lookup(kid)
        try:
            if key is None:
                signed = jose.extract_compact(raw, registry=jose.registry)
            else:
                signed = jose.deserialize_compact(raw, key, registry=jose.registry)
        except jose.bad_signature:
            raise InvalidCallerToken("token signature does not verify") from None
        except jose.decode_error:
            # The header passed our stricter parse already: what failed is the payload.
            raise InvalidCallerToken("malformed token payload") from None
        except (jose.error, ValueError, TypeError, RecursionError):
            raise InvalidCallerToken("malformed token") from None
        return signed.payload, key

    def _warn_signed_in_platform_mode(self) -> None:
        """A deployment problem, not just a bad caller: said in the log, at most every 5 min."""
        now = time.monotonic()
        if now - self._warned_signed_at >= 300:
            self._warned_signed_at = now
            get_logger(component="idtoken").warning(
                "a caller token arrived with its signature in platform mode: the service may "
                "be invocable without IAM (check the run.invoker binding and ingress), or the "
                "issuer should run with TOKENBROKER_CALLER_IDENTITY=verify"
            )

    @staticmethod
    def _check_header(header_b64: bytes, jose: _Jose) -> str:
        """The JOSE header's rules (RFC 7515 §4.1, RFC 8725 §3.1, §3.10, §3.11); its ``kid``.

        Decoded here (joserfc's strict base64url, then our JSON decoder: duplicate members and
        NaN refused), checked with our rules and fixed messages, then with joserfc's header
        registry (types of the registered parameters, e.g. ``cty`` a string). Run once per
        distinct encoded header: accepted ones are remembered.
        """
        try:
            decoded = jose.b64decode(header_b64)
        except ValueError:  # binascii.Error: a length or last character base64url cannot have
            raise InvalidCallerToken("malformed token header") from None
        header = _json_object(decoded, "header", _header_decoder)
        alg = header.get("alg")
        if alg != ALLOWED_ALG:
            named = f" {alg!r}" if isinstance(alg, str) and alg in _KNOWN_ALGS else ""
            raise InvalidCallerToken(f"token alg{named} not allowed: only RS256 is accepted")
        for name in FORBIDDEN_HEADERS:
            if name in header:
                raise InvalidCallerToken(f"token header parameter {name!r} is not accepted")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise InvalidCallerToken("token typ is not JWT")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            raise InvalidCallerToken("token header has no usable kid")
        try:
            jose.registry.check_header(header)
        except (jose.error, ValueError, TypeError):
            raise InvalidCallerToken("malformed token header") from None
        return kid

    def _check_claims(self, claims: Mapping[str, Any], now: float) -> tuple[Caller, float]:
        """RFC 7519 §4.1 registered claims, then the caller's identity (OIDC Core §5.1)."""
        iss = self._check_issuer_and_audience(claims)
        exp = self._check_times(claims, now)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise InvalidCallerToken("token has no sub claim")
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise InvalidCallerToken("token has no email claim")
        if self.require_email_verified:
            verified = claims.get("email_verified")
            # Google has sent both the JSON boolean and the string "true".
            if verified is not True and verified != "true":
                raise InvalidCallerToken("token email is not verified")
        caller = Caller(
            email=ascii_lower(email),
            subject=sub,
            issuer=iss,
            expires_at=datetime.fromtimestamp(exp, UTC),
        )
        return caller, exp

    def _check_issuer_and_audience(self, claims: Mapping[str, Any]) -> str:
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise InvalidCallerToken("token has no iss claim")
        if iss not in self.issuers:
            raise InvalidCallerToken("token iss is not a trusted issuer")
        aud = claims.get("aud")
        if aud is None or aud in ("", []):
            raise InvalidCallerToken("token has no aud claim")
        # RFC 7519 §4.1.3: a string or an array of strings, one of which must identify us.
        # ``azp`` is not compared: in Google's service-account tokens it names the caller's
        # client, not us (OIDC Core §3.1.3.7 makes it a SHOULD for the requesting client).
        if isinstance(aud, str):
            audience_ok = aud in self.audiences
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audience_ok = not self.audiences.isdisjoint(aud)
        else:
            raise InvalidCallerToken("token aud claim is malformed")
        if not audience_ok:
            raise InvalidCallerToken("token aud does not match this service's audience")
        return iss

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float:
        """``exp`` (RFC 7519 §4.1.4), ``iat`` (§4.1.6), ``nbf`` (§4.1.5), each with leeway."""
        exp = _number(claims, "exp")
        if exp is None:
            raise InvalidCallerToken("token has no numeric exp claim")
        iat = _number(claims, "iat")
        if iat is None:
            raise InvalidCallerToken("token has no numeric iat claim")
        if now >= exp + self.leeway:
            raise InvalidCallerToken("token expired")
        if iat > now + self.leeway:
            raise InvalidCallerToken("token issued in the future (iat)")
        if "nbf" in claims:
            nbf = _number(claims, "nbf")
            if nbf is None:
                raise InvalidCallerToken("token nbf claim is not a number")
            if nbf > now + self.leeway:
                raise InvalidCallerToken("token not valid yet (nbf)")
        if exp - iat > self.max_lifetime:
            raise InvalidCallerToken(
                f"token lifetime exceeds {int(self.max_lifetime)} seconds (exp - iat)"
            )
        return exp


__all__ = [
    "ALLOWED_ALG",
    "FORBIDDEN_HEADERS",
    "GOOGLE_CERTS_URL",
    "GOOGLE_ISSUERS",
    "SIGNATURE_REMOVED",
    "Caller",
    "Fetch",
    "IdTokenVerifier",
    "IdentityMode",
    "JwksDocument",
    "KeySet",
    "KeysDocumentError",
    "KeysFetchNeeded",
    "credential_header",
    "parse_jwks",
    "parse_max_age",
    "urllib_fetch",
]
