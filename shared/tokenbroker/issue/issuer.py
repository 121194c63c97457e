"""The token issuer: short-lived, scoped tokens for IAM-authenticated callers.

The hot path (``TokenIssuer.issue``) is: verify the caller's ID token (cached keys), check
the policy (precomputed lookups), and answer from the instance cache. Secret reads happen only
on a cache miss or when a newer credential version exists, so at steady state far fewer than 1
secret read per 100 tokens issued.

How a token is produced depends on the connection, in this order (the broker never hands out
a master credential: client secrets and refresh tokens never leave it):

1. **Google service account** (``jwt_bearer``, or any connection naming ``service_account``):
   a new token with exactly the requested scopes and a lifetime bounded by the policy, minted
   through the IAM Credentials API (``generateAccessToken``), never the broker's own token.
2. **OAuth connection whose provider can narrow scopes** (RFC 6749 §6: a refresh may request a
   subset of the granted scope) and does not rotate refresh tokens: a refresh with the narrower
   ``scope``, cached per (connection, scope set). Like every path that presents a refresh
   token, it holds the connection's lease meanwhile (taken through the state store, as the
   refresher takes it); while a refresh is in flight the caller is asked to retry shortly.
3. **Otherwise**: the connection's current access token, and only to callers the policy grants
   the connection's full scope (``"*"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from tokenbroker.issue.live import LiveRecords, outcome_of, read_credential, state_call
from tokenbroker.issue.policy import IssuePolicy, TokenGrant
from tokenbroker.kernel.clock import Clock, SystemClock, isoformat
from tokenbroker.kernel.errors import (
    BadRequest,
    CredentialUnavailable,
    NeedsReauth,
    NotFound,
    PolicyDenied,
    ScopeNotHeld,
    TokenBrokerError,
)
from tokenbroker.kernel.log import LineTemplate, get_logger
from tokenbroker.kernel.metrics import Recorder
from tokenbroker.kernel.model import (
    Connection,
    ConnectionRecord,
    Credential,
    GrantType,
    Lease,
    StoredCredential,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.budget import budget_request
from tokenbroker.oauth.grants import refresh_grant, service_account_info
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.oauth.token_response import TokenResponse
from tokenbroker.ports import CallerVerifier, Impersonator, SecretStore, StateStore, TokenEndpoint

MAX_BODY_BYTES = 16 * 1024


class _Unknown:
    """No current version known: the secret store reads its own pointer."""


_UNKNOWN = _Unknown()
DENIED = "caller is not allowed this connection"


@dataclass(frozen=True)
class TokenRequest:
    connection: str
    scopes: tuple[str, ...] | None = None
    min_ttl_seconds: int | None = None

    @classmethod
    def parse(cls, body: bytes) -> TokenRequest:
        """The JSON body of ``POST /token``; anything else is a 400 that says what is wrong."""
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # too deep: not a request
            raise BadRequest("request body is not JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        unknown = sorted(set(data) - {"connection", "scopes", "min_ttl_seconds"})
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(unknown)}")
        connection = data.get("connection")
        if not isinstance(connection, str) or not connection or len(connection) > 63:
            raise BadRequest("connection: a connection id (string) is required")
        scopes = data.get("scopes")
        if scopes is not None:
            if not isinstance(scopes, list) or not all(
                isinstance(s, str) and s and " " not in s and len(s) <= 512 for s in scopes
            ):
                raise BadRequest("scopes: must be a list of scope strings")
            if len(scopes) > 64:
                raise BadRequest("scopes: at most 64")
        min_ttl = data.get("min_ttl_seconds")
        if min_ttl is not None and (
            isinstance(min_ttl, bool) or not isinstance(min_ttl, int) or not 0 <= min_ttl <= 43200
        ):
            raise BadRequest("min_ttl_seconds: must be an integer between 0 and 43200")
        return cls(
            connection=connection,
            scopes=tuple(sorted(set(scopes))) if scopes else None,
            min_ttl_seconds=min_ttl,
        )


@dataclass(frozen=True)
class IssuedToken:
    access_token: Secret
    expires_at: datetime
    refresh_after: datetime
    scope: tuple[str, ...]
    connection: str
    token_type: str = "Bearer"  # noqa: S105 - RFC 6750 token type

    @cached_property
    def _rendered(self) -> tuple[bytes, bytes]:
        """The response body around ``expires_in`` (the only part that changes between
        answers from the cache), rendered once per token."""
        marker = -987654321
        body = self.to_json(self.expires_at)
        body["expires_in"] = marker
        text = json.dumps(body, separators=(",", ":")).encode()
        # Split at the member, quotes included: inside a JSON string value a quote is always
        # escaped, so no token value (nor any other value) can contain this byte sequence.
        member = b'"expires_in":'
        before, found, after = text.partition(member + str(marker).encode())
        if not found:  # pragma: no cover - json.dumps writes the member exactly so
            raise AssertionError("expires_in member not rendered")
        return before + member, after

    @cached_property
    def _expires_ts(self) -> float:
        return self.expires_at.timestamp()

    @cached_property
    def _last(self) -> list[Any]:
        """The last answer rendered: [expires_in, body] (answers a second apart differ)."""
        return [None, b""]

    def expires_in(self, now: datetime) -> int:
        """Whole seconds left at ``now`` (the answer's ``expires_in``)."""
        return max(0, int(self._expires_ts - now.timestamp()))

    def render(self, now: datetime) -> bytes:
        """The JSON response body for an answer given at ``now``."""
        seconds = max(0, int(self._expires_ts - now.timestamp()))
        last = self._last
        if last[0] != seconds:
            before, after = self._rendered
            last[1] = before + str(seconds).encode() + after
            last[0] = seconds
        body: bytes = last[1]
        return body

    def to_json(self, now: datetime) -> dict[str, Any]:
        """The response body: the one place the token value is written out."""
        return {
            "access_token": self.access_token.reveal(),
            "token_type": self.token_type,
            "expires_at": isoformat(self.expires_at),
            "expires_in": max(0, int((self.expires_at - now).total_seconds())),
            "refresh_after": isoformat(self.refresh_after),
            "scope": " ".join(self.scope),
            "connection": self.connection,
        }


@dataclass
class _Audit:
    """What one decision found out, filled in as it goes."""

    outcome: str = "error"
    caller: str | None = None
    connection: str | None = None
    asked: tuple[str, ...] | None = None
    max_lifetime: int | None = None
    token: IssuedToken | None = None
    reason: str | None = None
    detail: str | None = None


def _request_key(authorization: str | None, body: bytes) -> bytes:
    """SHA-256 of the credential header and the body, unambiguously joined (the header's
    length first; ``surrogatepass`` encodes every ``str`` one way and distinctly)."""
    if authorization is None:
        return hashlib.sha256(b"\x00" + body).digest()
    header = authorization.encode("utf-8", "surrogatepass")
    return hashlib.sha256(b"\x01" + len(header).to_bytes(8, "big") + header + body).digest()


@dataclass
class _Ticket:
    """A request answered from the cache, remembered by its bytes (credential header, body;
    by their SHA-256) with what was decided for it: the next identical request re-checks only
    what can change -- the caller's verification (expiry, signing key), the connection's record (the
    store's change marker, status), the cached entry (still the one held for the decision,
    same version and registration, fresh enough) -- and takes the slow path, every check
    and error included, on any doubt. The decision itself cannot change: the policy is
    immutable once loaded and the inputs are the same bytes."""

    receipt: object
    connection_id: str
    cached: _Cached
    min_ttl: timedelta
    line: LineTemplate


@dataclass
class _Cached:
    token: IssuedToken
    #: The credential version it came from (``None``: minted, none used) and the
    #: registration it was made for: served only while the state still names both (versions
    #: start again at 1 when a connection is removed and registered again).
    version: int | None
    connection: Connection
    #: Still the entry the cache holds for its decision: cleared when it is evicted,
    #: replaced or forgotten (what a :class:`_Ticket` checks instead of a lookup).
    held: bool = True


class TokenIssuer:
    def __init__(
        self,
        *,
        verifier: CallerVerifier,
        policy: IssuePolicy,
        state: StateStore,
        secrets: SecretStore,
        profiles: Mapping[str, ProviderProfile],
        impersonator: Impersonator | None = None,
        endpoint: TokenEndpoint | None = None,
        clock: Clock | None = None,
        cache_size: int = 10_000,
        rng: random.Random | None = None,
        metrics: Recorder | None = None,
        lease_ttl: timedelta = timedelta(seconds=30),
    ) -> None:
        self.verifier = verifier
        self.policy = policy
        self.state = state
        self.secrets = secrets
        self.profiles = profiles
        self.impersonator = impersonator
        self.endpoint = endpoint
        self.clock = clock or SystemClock()
        self.cache_size = cache_size
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        #: The narrowing refresh's lease on the connection: longer than one request.
        self.lease_ttl = lease_ttl
        self.holder = f"issuer:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: Keyed by the whole decision (connection, scopes, full-scope pass-through, lifetime
        #: cap): a token is only ever served to a request the policy decided the same way.
        self._cache: OrderedDict[TokenGrant, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._requests: dict[bytes, TokenRequest] = {}
        self._grants: dict[tuple[str, TokenRequest], TokenGrant] = {}
        #: Requests answered from the cache (:class:`_Ticket`), keyed by SHA-256 of the
        #: header and body as the verifier keys its cache: no caller's ID token is kept.
        self._tickets: dict[bytes, _Ticket] = {}
        #: Each connection's record as the store has it now (status is live, without a state
        #: read per request while the store's change marker stands still).
        self._records = LiveRecords(state, denied=DENIED, on_stop=self._forget)
        self.secret_reads = 0
        self.issued = 0
        #: Decisions by audit outcome (issued, cache_hit, denied, ...); the same, with their
        #: latencies, in ``metrics`` (``issuer/decisions``, ``issuer/latency``).
        self.decisions: Counter[str] = Counter()
        self.metrics = metrics if metrics is not None else Recorder(self.clock.now())
        self._lines: dict[tuple[Any, ...], LineTemplate] = {}
        self.log = get_logger(component="issuer")

    # -- the hot path --------------------------------------------------------------------------

    async def issue(self, authorization: str | None, body: bytes) -> IssuedToken:
        """A token for the caller ``authorization`` vouches for, as ``body`` asks, or the
        error saying why not. Either way one audit line (:meth:`_audit`)."""
        started = time.perf_counter()
        ticket = self._tickets.get(_request_key(authorization, body))
        if ticket is not None:
            again = self._again(ticket, started)
            if again is not None:
                return again
        audit = _Audit()
        try:
            token = await self._decide(authorization, body, audit)
        except TokenBrokerError as error:
            audit.outcome, audit.reason = outcome_of(error), error.code
            audit.detail = str(error)
            raise
        except Exception:
            audit.outcome, audit.reason = "error", "internal_error"
            raise
        finally:
            self._audit(audit, started)
        return token

    def _audit(self, audit: _Audit, started: float) -> None:
        """The decision's line: who asked, for what, what they got (scope, lifetime, never
        the token), the outcome and its reason, and how long it took. The same outcomes
        count in ``decisions`` for the metrics."""
        outcome = audit.outcome
        self.decisions[outcome] += 1
        token = audit.token
        now = self.clock.now()
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.count("issuer/decisions", outcome)
        self.metrics.observe("issuer/latency", latency_ms, outcome)
        if token is not None:  # issued or a cache hit: the same line but for two numbers
            line = self._line(audit, audit.outcome, token)
            line.emit_values(token.expires_in(now), latency_ms)
            return
        fields: dict[str, Any] = {
            "outcome": audit.outcome,
            "caller": audit.caller,
            "connection": audit.connection,
            "scopes_asked": None if audit.asked is None else " ".join(audit.asked),
            "max_lifetime_seconds": audit.max_lifetime,
            "reason": audit.reason,
            "latency_ms": latency_ms,
        }
        if audit.detail is not None:
            fields["detail"] = audit.detail[:300]
        if audit.outcome == "error":
            self.log.error("token decision", **fields)
        else:
            self.log.warning("token decision", **fields)

    def _line(self, audit: _Audit, outcome: str, token: IssuedToken) -> LineTemplate:
        """The audit line of a decision that produced ``token``, rendered once per kind."""
        key = (outcome, audit.caller, audit.connection, audit.asked, token.scope,
               audit.max_lifetime)  # fmt: skip
        line = self._lines.get(key)
        if line is None:
            if len(self._lines) >= 4096:
                self._lines.clear()
            line = self._lines[key] = self.log.template(
                "info", "token decision", outcome=outcome, caller=audit.caller,
                connection=audit.connection,
                scopes_asked=None if audit.asked is None else " ".join(audit.asked),
                scope=" ".join(token.scope), max_lifetime_seconds=audit.max_lifetime,
                reason=None, numbers=("expires_in", "latency_ms"),
            )  # fmt: skip
        return line

    def _again(self, ticket: _Ticket, started: float) -> IssuedToken | None:
        """The answer to a request seen before (:class:`_Ticket`), or ``None``: decide it
        afresh. Synchronous: nothing here waits or reads a store."""
        now = self.clock.now()
        if not self.verifier.still_holds(ticket.receipt, now.timestamp()):
            return None
        record = self._records.peek(ticket.connection_id)
        if record is None:
            return None
        cached = ticket.cached
        token = cached.token
        if (
            not cached.held  # forgotten, evicted or replaced
            or cached.version not in (None, record.state.current_version)
            or (cached.connection is not record.connection
                and cached.connection != record.connection)
            or now >= token.refresh_after
            or token.expires_at - now < ticket.min_ttl
        ):  # fmt: skip
            return None
        self.issued += 1
        self.decisions["cache_hit"] += 1
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self.metrics.count("issuer/decisions", "cache_hit")
        self.metrics.observe("issuer/latency", latency_ms, "cache_hit")
        ticket.line.emit_values(token.expires_in(now), latency_ms)
        return token

    def _remember(
        self,
        authorization: str | None,
        body: bytes,
        audit: _Audit,
        cached: _Cached,
        min_ttl: timedelta,
    ) -> None:
        """Keep a :class:`_Ticket` for the request just answered (small bodies only)."""
        receipt = self.verifier.receipt(authorization) if len(body) <= 1024 else None
        if receipt is None or audit.connection is None:
            return
        if len(self._tickets) >= 4096:
            self._tickets.clear()
        self._tickets[_request_key(authorization, body)] = _Ticket(
            receipt, audit.connection, cached, min_ttl,
            self._line(audit, "cache_hit", cached.token),
        )  # fmt: skip

    async def _decide(self, authorization: str | None, body: bytes, audit: _Audit) -> IssuedToken:
        caller = await self.verifier.averify_authorization(authorization)  # fetches off-loop
        audit.caller = caller.email
        request = self._parse(body)
        audit.connection, audit.asked = request.connection, request.scopes
        grant = self._authorize(caller.email, request)
        audit.max_lifetime = grant.max_lifetime_seconds
        scopes = grant.scopes
        key = grant
        record = await self._records.get(request.connection)
        now = self.clock.now()
        min_ttl = timedelta(seconds=request.min_ttl_seconds or 0)
        cached = self._cached(key, now, min_ttl)
        if (
            cached is not None
            and cached.version in (None, record.state.current_version)
            and cached.connection == record.connection
        ):
            self.issued += 1
            audit.outcome, audit.token = "cache_hit", cached.token
            self._remember(authorization, body, audit, cached, min_ttl)
            return cached.token
        token, version = await self._produce(record, scopes, grant, now, min_ttl)
        entry = _Cached(token, version, record.connection)
        with self._lock:
            replaced = self._cache.get(key)
            if replaced is not None:
                replaced.held = False
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)[1].held = False
        self.issued += 1
        audit.outcome, audit.token = "issued", token
        self._remember(authorization, body, audit, entry, min_ttl)
        return token

    def _parse(self, body: bytes) -> TokenRequest:
        """Parsed requests, remembered by their bytes: workers send the same few bodies."""
        request = self._requests.get(body)
        if request is None:
            request = TokenRequest.parse(body)
            if len(body) <= 1024:  # a typical body is ~30 bytes; keep the memo small
                if len(self._requests) >= 4096:
                    self._requests.clear()
                self._requests[body] = request
        return request

    def _authorize(self, caller_email: str, request: TokenRequest) -> TokenGrant:
        """Policy decisions, remembered: the policy is immutable once loaded. Denials are
        not remembered (they raise), so they cost a lookup each time."""
        key = (caller_email, request)
        grant = self._grants.get(key)
        if grant is None:
            grant = self.policy.authorize(
                caller_email, request.connection, request.scopes, request.min_ttl_seconds
            )
            if len(self._grants) >= 4096:
                self._grants.clear()
            self._grants[key] = grant
        return grant

    def _cached(self, key: TokenGrant, now: datetime, min_ttl: timedelta) -> _Cached | None:
        with self._lock:
            entry = self._cache.get(key)
        if entry is None:
            return None
        if now >= entry.token.refresh_after or entry.token.expires_at - now < min_ttl:
            return None
        return entry

    def _forget(self, connection_id: str) -> None:
        """Drop the connection's cached tokens: none is served again once it stopped."""
        with self._lock:
            for key in [k for k in self._cache if k.connection_id == connection_id]:
                self._cache.pop(key).held = False

    # -- producing a token ---------------------------------------------------------------------

    async def _produce(
        self,
        record: ConnectionRecord,
        scopes: tuple[str, ...] | None,
        grant: TokenGrant,
        now: datetime,
        min_ttl: timedelta,
    ) -> tuple[IssuedToken, int | None]:
        connection = record.connection
        connection_id = connection.id
        profile = self.profiles.get(connection.profile)
        if profile is None:
            raise CredentialUnavailable(f"connection {connection_id!r}: unknown profile")
        max_lifetime = grant.max_lifetime_seconds
        if scopes is not None and connection.scopes:
            # Even a "*" caller gets no scope the connection was never granted: refused here,
            # before a refresh token is presented or a token minted.
            extra = sorted(set(scopes) - set(connection.scopes))
            if extra:
                raise ScopeNotHeld(f"connection {connection_id!r} does not hold: {' '.join(extra)}")

        sa_email = connection.params.get("service_account")
        if sa_email or connection.grant is GrantType.JWT_BEARER:
            return await self._impersonate(connection, sa_email, scopes, max_lifetime, now), None

        narrow = scopes is not None and set(scopes) != set(connection.scopes)
        if narrow:
            if profile.supports_scope_narrowing and not profile.rotates_refresh_tokens:
                token = await self._narrowed(connection, profile, scopes or (), max_lifetime, now)
                return token, record.state.current_version
            raise PolicyDenied(
                f"connection {connection_id!r} cannot issue narrowed tokens; "
                "ask for its full scope (requires a full-scope grant)"
            )
        if not grant.full_scope_allowed:
            raise PolicyDenied("scope not allowed: the connection's full scope")
        stored = await self._read_current(connection_id, record.state.current_version)
        credential = stored.credential
        if credential.access_token is None or credential.expires_at is None:
            raise CredentialUnavailable(
                f"connection {connection_id!r} has no access token yet", retry_after=30
            )
        if credential.expires_at - now < max(min_ttl, timedelta(seconds=5)):
            raise CredentialUnavailable(
                f"connection {connection_id!r}: the current token expires too soon",
                retry_after=30,
            )
        expires_at = min(credential.expires_at, now + timedelta(seconds=max_lifetime))
        token = IssuedToken(
            access_token=credential.access_token,
            token_type=credential.token_type,
            expires_at=expires_at,
            refresh_after=self._refresh_after(now, expires_at),
            scope=credential.scope or connection.scopes,
            connection=connection_id,
        )
        return token, stored.version

    async def _read_current(
        self, connection_id: str, pointer: int | _Unknown | None = _UNKNOWN
    ) -> StoredCredential:
        """The current credential; ``pointer``: the current version the live record names (a
        store whose pointer is the state record then does not read it again)."""
        import asyncio  # noqa: PLC0415

        try:
            stored = await asyncio.to_thread(self._get, connection_id, pointer)
        except NotFound:
            raise CredentialUnavailable(
                f"connection {connection_id!r} has no credential yet", retry_after=30
            ) from None
        except TokenBrokerError as error:
            if error.retryable:
                raise CredentialUnavailable(
                    f"credential store unavailable ({error.code})", retry_after=5
                ) from None
            raise
        self.secret_reads += 1
        return stored

    def _get(self, connection_id: str, pointer: int | _Unknown | None) -> StoredCredential:
        if isinstance(pointer, _Unknown):
            return self.secrets.get(connection_id)
        return read_credential(self.secrets, connection_id, pointer)

    def _refresh_after(self, now: datetime, expires_at: datetime) -> datetime:
        """A jittered hint well before expiry: between 40% and 60% of the remaining life."""
        remaining = expires_at - now
        return now + remaining * (0.4 + 0.2 * self.rng.random())

    async def _impersonate(
        self,
        connection: Connection,
        sa_email: str | None,
        scopes: tuple[str, ...] | None,
        max_lifetime: int,
        now: datetime,
    ) -> IssuedToken:
        if self.impersonator is None:
            raise CredentialUnavailable("service-account impersonation is not configured")
        if not sa_email:
            stored = await self._read_current(connection.id)
            if stored.credential.private_key is None:
                raise CredentialUnavailable(f"connection {connection.id!r} has no key")
            sa_email = str(service_account_info(stored.credential.private_key)["client_email"])
        wanted = scopes if scopes is not None else connection.scopes
        if not wanted:
            raise BadRequest("scopes: this connection needs explicit scopes")
        lifetime = min(max_lifetime, 3600)
        minted = await self.impersonator.generate_access_token(sa_email, wanted, lifetime)
        return IssuedToken(
            access_token=minted.access_token,
            expires_at=minted.expires_at,
            refresh_after=self._refresh_after(now, minted.expires_at),
            scope=tuple(wanted),
            connection=connection.id,
        )

    async def _narrowed(
        self,
        connection: Connection,
        profile: ProviderProfile,
        scopes: Sequence[str],
        max_lifetime: int,
        now: datetime,
    ) -> IssuedToken:
        """RFC 6749 §6 refresh asking for a subset of the granted scope ("MUST NOT include
        any scope not originally granted"). Only for providers whose profile says they do not
        rotate refresh tokens (RFC 6749 §6: the server "MAY issue a new refresh token").

        If one rotates anyway, the new refresh token is **not** stored: the issuer is a read
        path and never writes credentials. Only the refresher, holding the connection's lease,
        may write (its fencing token is what keeps two writers from interleaving, and a burst
        of callers must not become a burst of writes). The caller still gets its token; an
        error line naming the connection (never the token) tells the operator that the
        profile's ``rotates_refresh_tokens = false`` is wrong for this provider, whose stored
        refresh token may now be spent.

        The refresh token is presented under the connection's lease (:meth:`_lease`), as the
        refresher presents it: the two never send it at once.
        """
        if self.endpoint is None:
            raise CredentialUnavailable("scope narrowing is not configured")
        lease = await self._lease(connection.id, now)
        try:
            response = await self._narrowing_refresh(connection, profile, scopes)
        finally:
            await self._give_back(lease)
        # RFC 6749 §5.1: the answer's ``scope`` is the token's real scope when it differs
        # from the request's. Wider than asked -- scopes the caller was not granted -- is
        # never handed out.
        granted = tuple(scopes) if response.scope is None else tuple(response.scope)
        wider = sorted(set(granted) - set(scopes))
        if wider:
            self.log.error(
                "provider widened a narrowing refresh's scope: token discarded",
                connection=connection.id,
                asked=" ".join(scopes),
                widened_by=" ".join(wider),
            )
            raise CredentialUnavailable(
                f"connection {connection.id!r}: the provider widened the scope asked for"
                f" (added {' '.join(wider)}); no token issued"
            )
        lifetime = response.expires_in or profile.default_lifetime_seconds
        expires_at = now + timedelta(seconds=min(lifetime, max_lifetime))
        return IssuedToken(
            access_token=response.access_token,
            token_type=response.token_type,
            expires_at=expires_at,
            refresh_after=self._refresh_after(now, expires_at),
            scope=granted,
            connection=connection.id,
        )

    async def _lease(self, connection_id: str, now: datetime) -> Lease:
        """The connection's lease for one narrowing refresh, or why not: a refresh is in
        flight (503, retry shortly), or the connection is not active (status is law)."""

        batch = await state_call(
            lambda: self.state.claim([connection_id], now, holder=self.holder, ttl=self.lease_ttl)
        )
        if batch.claims:
            return batch.claims[0].lease
        if batch.missing:
            raise PolicyDenied(DENIED)
        if connection_id in batch.inactive:
            raise NeedsReauth(
                f"connection {connection_id!r} is {batch.inactive[connection_id].value}"
            )
        raise CredentialUnavailable(
            f"connection {connection_id!r} is being refreshed; retry shortly", retry_after=2
        )

    async def _give_back(self, lease: Lease) -> None:
        import asyncio  # noqa: PLC0415

        try:
            await asyncio.to_thread(self.state.release, lease)
        except TokenBrokerError as error:  # it expires by itself after lease_ttl
            self.log.warning(
                "narrowing lease not given back",
                connection=lease.connection_id,
                error_code=error.code,
            )

    async def _spend_budget(
        self, connection: Connection, profile: ProviderProfile, current: Credential
    ) -> None:
        """Take one slot of the provider's token-endpoint budget, the refresher's budget too
        (the same key, the same state store): over it, the caller is told when to come back
        and nothing is sent. A budget that cannot be read is never a grant."""
        import asyncio  # noqa: PLC0415

        request = budget_request(connection, profile, current)
        if request is None:
            return
        now = self.clock.now()
        try:
            decision = await asyncio.to_thread(
                self.state.take_budget, request.key, limit=request.limit,
                window=request.window, now=now, cost=request.cost,
            )  # fmt: skip
        except TokenBrokerError as error:
            raise CredentialUnavailable(
                f"state store unavailable ({error.code})", retry_after=5
            ) from None
        if not decision.granted:
            frees_at = decision.frees_at or now + request.window
            wait = max(1, math.ceil((frees_at - now).total_seconds()))
            raise CredentialUnavailable(
                f"connection {connection.id!r}: the provider's token-endpoint budget is spent",
                retry_after=wait,
            )

    async def _narrowing_refresh(
        self, connection: Connection, profile: ProviderProfile, scopes: Sequence[str]
    ) -> TokenResponse:
        """The refresh itself, under the lease; the credential is read after taking it (the
        refresher may have rotated it just before)."""
        assert self.endpoint is not None  # noqa: S101 - checked by the caller
        stored = await self._read_current(connection.id)
        current = stored.credential
        if current.refresh_token is None:
            raise CredentialUnavailable(f"connection {connection.id!r} has no refresh token")
        await self._spend_budget(connection, profile, current)
        try:
            response = await refresh_grant(
                self.endpoint,
                profile.token_url_for(connection),
                refresh_token=current.refresh_token,
                client_id=connection.client_id,
                client_secret=current.client_secret,
                auth_method=profile.auth_method_for(connection),
                scopes=scopes,
                error_aliases=profile.error_aliases,
            )
        except TokenBrokerError as error:
            if error.retryable:
                raise CredentialUnavailable(
                    f"provider unavailable ({error.code})", retry_after=error.retry_after or 10
                ) from None
            if error.code == "invalid_scope":  # RFC 6749 §5.2: not granted to this connection
                raise ScopeNotHeld(
                    f"connection {connection.id!r}: the provider refused the scope asked for"
                ) from None
            raise CredentialUnavailable(f"provider refused ({error.code})") from None
        if response.refresh_token is not None and response.refresh_token != current.refresh_token:
            self.log.error(
                "narrowing refresh rotated the refresh token; not stored (only the leased "
                "refresher writes credentials): fix the profile's rotates_refresh_tokens",
                connection=connection.id,
                profile=profile.name,
            )
        return response
