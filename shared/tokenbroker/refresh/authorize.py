"""Connecting an account: the authorization-code flow with PKCE (RFC 6749 §4.1, RFC 7636).

:meth:`AuthorizationFlow.start` builds the authorization URL and stores an
:class:`~tokenbroker.ports.AuthorizationSession` under the hash of a fresh ``state``: random,
single use, bound to the connection and the operator, short-lived (10 minutes by default;
RFC 9700 §4.7 and §2.1.1 for ``state`` and PKCE as CSRF protection).

:meth:`AuthorizationFlow.complete` answers the callback, in an order that never lets a
forged, replayed or stale callback reach the provider:

1. the callback is parsed (a repeated parameter, or no ``state``: refused);
2. the session is **taken out** of the store (atomic: a second presentation of the same state
   finds nothing -- ``unknown``), then checked: expired, another connection, another operator
   are refused; nothing has been sent;
3. a provider error in the callback (``access_denied``, RFC 6749 §4.1.2.1) is raised as its
   classified error;
4. the code is exchanged once (no retry: a code is single use, RFC 6749 §4.1.2), with the
   session's ``code_verifier`` and the connection's client authentication;
5. the granted scopes are compared with the declared ones: a narrower grant is refused
   (:class:`~tokenbroker.kernel.errors.InsufficientGrant`, nothing stored) unless the operator
   accepts it, and then it is recorded in the credential's ``scope`` and logged;
6. the credential is stored through the registry (``register`` for a new connection,
   ``reconnect`` for an existing one: active, failure history cleared), and the event is
   announced: ``connection.connected``, or ``connection.recovered`` for a connection that was
   failing (``needs_reauth``, failures, at risk). Events are parked in the state store first
   (the outbox), then published; a bus that fails leaves them parked for the next tick's relay.

Nothing of the code, the verifier or the tokens is logged, raised or returned in a printable
form: they are :class:`~tokenbroker.kernel.secret.Secret` values end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from tokenbroker.kernel.clock import Clock, isoformat
from tokenbroker.kernel.errors import (
    AlreadyExists,
    ConfigError,
    InsufficientGrant,
    InvalidAuthorizationState,
    NotFound,
    TokenBrokerError,
)
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import (
    Connection,
    ConnectionEvent,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    EventType,
    GrantType,
    validate_connection_id,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.authorization import (
    AuthorizationError,
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
from tokenbroker.oauth.device import (
    DeviceAuthorization,
    poll_device_token,
    request_device_authorization,
)
from tokenbroker.oauth.grants import authorization_code_grant
from tokenbroker.oauth.token_response import TokenResponse
from tokenbroker.ports import AuthorizationSession, AuthorizationSessions, EventBus, TokenEndpoint
from tokenbroker.refresh.registry import ConnectionRegistry

#: How long an authorization request may take to come back (RFC 9700 §4.7.1 asks for
#: short-lived, single-use state; a person logs in and consents in minutes).
DEFAULT_SESSION_TTL = timedelta(minutes=10)
MAX_SESSION_TTL = timedelta(hours=1)


@dataclass(frozen=True)
class AuthorizationStart:
    """Where to send the account holder, and until when the answer is accepted."""

    connection_id: str
    url: str
    expires_at: datetime

    def __repr__(self) -> str:  # the URL carries the state: not for logs
        return f"AuthorizationStart(connection_id={self.connection_id!r})"


@dataclass(frozen=True)
class DeviceStart:
    """A device authorization in progress: what to show the account holder
    (:attr:`authorization`'s verification URI and user code), and what completing it needs."""

    connection: Connection
    new: bool
    client_secret: Secret | None
    authorization: DeviceAuthorization

    def __repr__(self) -> str:  # the user code approves the request: not for logs
        return f"DeviceStart(connection_id={self.connection.id!r}, new={self.new})"


@dataclass(frozen=True)
class Connected:
    """What a completed flow stored."""

    record: ConnectionRecord
    new: bool
    granted_scopes: tuple[str, ...]
    #: Declared scopes the provider did not grant (accepted by the operator when not empty).
    missing_scopes: tuple[str, ...]
    event: ConnectionEvent

    def to_json(self) -> dict[str, object]:
        return {
            "connection": self.record.connection.id,
            "new": self.new,
            "status": self.record.state.status.value,
            "version": self.record.state.current_version,
            "expires_at": isoformat(self.record.state.expires_at),
            "granted_scopes": list(self.granted_scopes),
            "missing_scopes": list(self.missing_scopes),
            "event": self.event.type.value,
        }


class AuthorizationFlow:
    def __init__(
        self,
        *,
        sessions: AuthorizationSessions,
        registry: ConnectionRegistry,
        events: EventBus,
        clock: Clock,
        ttl: timedelta = DEFAULT_SESSION_TTL,
    ) -> None:
        if not timedelta(0) < ttl <= MAX_SESSION_TTL:
            raise ConfigError("the authorization session lifetime must be (0, 1 h]")
        self.sessions = sessions
        self.registry = registry
        self.events = events
        self.clock = clock
        self.ttl = ttl
        self.log = get_logger(component="authorize")

    # -- start -------------------------------------------------------------------------------

    def start_new(
        self, connection: Connection, *, operator: str, redirect_uri: str
    ) -> AuthorizationStart:
        """Start connecting an account as a new connection (registered on the callback)."""
        self._check_new(connection)
        return self._start(connection, operator=operator, redirect_uri=redirect_uri, new=True)

    def start_existing(
        self, connection_id: str, *, operator: str, redirect_uri: str
    ) -> AuthorizationStart:
        """Start re-authorising a registered connection (e.g. one in ``needs_reauth``)."""
        return self._start(
            self._existing(connection_id), operator=operator, redirect_uri=redirect_uri, new=False
        )

    def _check_new(self, connection: Connection) -> None:
        """A new connection may be connected: a valid id, the refresh-token grant, a profile
        that takes it, and no connection of that id yet."""
        validate_connection_id(connection.id)
        if connection.grant is not GrantType.REFRESH_TOKEN:
            raise ConfigError("grant: connecting an account gives a refresh_token connection")
        self.registry.profile_for(connection).check_connection(connection)
        if self._exists(connection.id):
            raise AlreadyExists(
                f"connection {connection.id!r} already exists: authorize it by its id"
            )

    def _existing(self, connection_id: str) -> Connection:
        """A registered connection an account holder may re-authorise (refresh-token grant)."""
        connection = self.registry.state.get(connection_id).connection
        if connection.grant is not GrantType.REFRESH_TOKEN:
            raise ConfigError(
                f"connection {connection_id!r} uses {connection.grant.value}: only "
                "refresh_token connections are authorised by an account holder"
            )
        return connection

    def _start(
        self, connection: Connection, *, operator: str, redirect_uri: str, new: bool
    ) -> AuthorizationStart:
        if not operator:
            raise ConfigError("the operator starting the flow must be named")
        profile = self.registry.profile_for(connection)
        state, verifier = new_state(), new_code_verifier()
        url = authorization_request_url(
            profile,
            connection,
            redirect_uri=redirect_uri,
            state=state,
            challenge=code_challenge(verifier),
        )
        now = self.clock.now()
        self.sessions.purge(now)
        session = AuthorizationSession(
            key=state_key(state),
            connection=connection,
            operator=operator,
            redirect_uri=redirect_uri,
            code_verifier=verifier,
            created_at=now,
            expires_at=now + self.ttl,
            new=new,
        )
        self.sessions.put(session)
        self.log.info(
            "authorization started", connection_id=connection.id, new=new, operator=operator
        )
        return AuthorizationStart(connection.id, url, session.expires_at)

    # -- callback ----------------------------------------------------------------------------

    def take_session(
        self, params: Sequence[tuple[str, str]], *, connection_id: str, operator: str
    ) -> tuple[AuthorizationSession, AuthorizationError | None, Secret | None, dict[str, str]]:
        """Steps 1-2: the callback parsed, its session taken out and checked. Raises
        :class:`InvalidAuthorizationState` for anything that does not answer a live request
        of this operator for this connection."""
        parsed = parse_callback(params)
        try:
            session = self.sessions.take(state_key(parsed.state))
        except NotFound:
            raise InvalidAuthorizationState(
                "the callback's state is unknown or was already used: start the authorization "
                "again",
                reason="unknown",
            ) from None
        if self.clock.now() >= session.expires_at:
            raise InvalidAuthorizationState(
                f"the authorization request for {session.connection.id!r} expired (it is valid "
                f"for {int(self.ttl.total_seconds())} s): start it again",
                reason="expired",
            )
        if session.connection.id != connection_id:
            raise InvalidAuthorizationState(
                f"the callback's state was issued for another connection, not {connection_id!r}",
                reason="other_connection",
            )
        if session.operator != operator:
            raise InvalidAuthorizationState(
                "the callback's state was issued to another operator", reason="other_operator"
            )
        if isinstance(parsed, AuthorizationError):
            return session, parsed, None, {}
        return session, None, parsed.code, dict(parsed.extras)

    async def complete(
        self,
        endpoint: TokenEndpoint,
        params: Sequence[tuple[str, str]],
        *,
        connection_id: str,
        operator: str,
        client_secret: Secret | None = None,
        accept_narrower: bool = False,
    ) -> Connected:
        """Answer the callback (the module docstring's steps). ``client_secret``: a new
        connection's (an existing one uses its stored secret)."""
        session, refusal, code, extras = self.take_session(
            params, connection_id=connection_id, operator=operator
        )
        cid = session.connection.id
        if refusal is not None:
            self.log.warning(
                "authorization refused by the provider",
                connection_id=cid,
                error_code=refusal.error.code,
            )
            raise refusal.error
        assert code is not None  # noqa: S101 - take_session returns a code or a refusal
        connection, secret = self._connection_for(session, extras, client_secret)
        profile = self.registry.profile_for(connection)
        now = self.clock.now()
        response = await authorization_code_grant(
            endpoint,
            profile.token_url_for(connection),
            code=code,
            redirect_uri=session.redirect_uri,
            code_verifier=session.code_verifier,
            client_id=connection.client_id,
            client_secret=secret,
            auth_method=profile.auth_method_for(connection),
            rules=profile.answer_rules,
            now=now,
        )
        return self._store(
            connection,
            secret,
            response,
            now=now,
            new=session.new,
            accept_narrower=accept_narrower,
        )

    # -- the device authorization grant (RFC 8628) --------------------------------------------

    async def start_device(
        self,
        endpoint: TokenEndpoint,
        *,
        connection_id: str,
        operator: str,
        connection: Connection | None = None,
        client_secret: Secret | None = None,
    ) -> DeviceStart:
        """Ask the provider for a device code and a user code (RFC 8628 §3.1) for a new
        connection (``connection``, with its ``client_secret``) or a registered one (by id,
        with its stored secret). Checked like :meth:`start_new` / :meth:`start_existing`."""
        if not operator:
            raise ConfigError("the operator starting the flow must be named")
        new = connection is not None
        if connection is not None:
            self._check_new(connection)
            secret = client_secret
        else:
            connection = self._existing(connection_id)
            secret = self.registry.secrets.get(connection_id).credential.client_secret
        profile = self.registry.profile_for(connection)
        authorization = await request_device_authorization(
            endpoint,
            profile.device_authorization_url_for(connection),
            client_id=connection.client_id,
            client_secret=secret,
            auth_method=profile.auth_method_for(connection),
            scopes=connection.scopes,
            rules=profile.answer_rules,
            now=self.clock.now(),
        )
        self.log.info(
            "device authorization started",
            connection_id=connection.id,
            new=new,
            operator=operator,
            expires_in=authorization.expires_in,
            interval=authorization.interval,
        )
        return DeviceStart(connection, new, secret, authorization)

    async def complete_device(
        self,
        endpoint: TokenEndpoint,
        start: DeviceStart,
        *,
        accept_narrower: bool = False,
        wait_seconds: float | None = None,
    ) -> Connected:
        """Poll until the account holder answers (RFC 8628 §3.4-3.5), then store the
        connection as :meth:`complete` does (same checks, same events)."""
        connection = start.connection
        profile = self.registry.profile_for(connection)
        try:
            response = await poll_device_token(
                endpoint,
                profile.token_url_for(connection),
                start.authorization,
                client_id=connection.client_id,
                client_secret=start.client_secret,
                auth_method=profile.auth_method_for(connection),
                clock=self.clock,
                rules=profile.answer_rules,
                wait_seconds=wait_seconds,
            )
        except TokenBrokerError as error:
            self.log.warning(
                "device authorization ended without a grant",
                connection_id=connection.id,
                error_code=error.code,
            )
            raise
        secret = start.client_secret
        if start.new:
            if self._exists(connection.id):
                raise AlreadyExists(f"connection {connection.id!r} was registered meanwhile")
        else:
            # The wait may have lasted minutes: the connection must still be the one the
            # grant was asked for (not removed, not added again for another client, not
            # reconfigured), and its client secret is the one stored now (an operator may
            # have replaced it meanwhile) -- else nothing is stored.
            try:
                record = self.registry.state.get(connection.id)
            except NotFound:
                raise NotFound(
                    f"connection {connection.id!r} was removed while the account holder "
                    "answered; nothing was stored"
                ) from None
            if record.connection != connection:
                raise ConfigError(
                    f"connection {connection.id!r} was changed (or removed and added again) "
                    "while the account holder answered; nothing was stored: authorize it again"
                )
            secret = self.registry.secrets.get(connection.id).credential.client_secret
        return self._store(
            connection,
            secret,
            response,
            now=self.clock.now(),
            new=start.new,
            accept_narrower=accept_narrower,
        )

    # -- storing what was granted --------------------------------------------------------------

    def _store(
        self,
        connection: Connection,
        secret: Secret | None,
        response: TokenResponse,
        *,
        now: datetime,
        new: bool,
        accept_narrower: bool,
    ) -> Connected:
        """Steps 5-6 of the module docstring, for either flow."""
        cid = connection.id
        granted = granted_scopes(connection.scopes, response.scope)
        missing = missing_scopes(connection.scopes, granted)
        if missing:
            self.log.warning(
                "the provider granted fewer scopes than declared",
                connection_id=cid,
                missing=list(missing),
                accepted=accept_narrower,
            )
            if not accept_narrower:
                raise InsufficientGrant(
                    f"connection {cid!r}: the provider did not grant {' '.join(missing)}; "
                    "nothing was stored. Consent to every scope, declare fewer, or accept the "
                    "narrower grant (--accept-narrower-scopes)",
                    missing=missing,
                )
        if response.refresh_token is None:
            raise ConfigError(
                f"connection {cid!r}: the provider answered without a refresh token; nothing "
                "was stored (check the profile's authorize_params, e.g. access_type=offline "
                "and prompt=consent, or the client's refresh_token grant)"
            )
        for warning in response.warnings:
            self.log.warning("token answer was odd but usable", connection_id=cid, warning=warning)
        credential = Credential(
            access_token=response.access_token,
            refresh_token=response.refresh_token,
            client_secret=secret,
            token_type=response.token_type,
            scope=granted,
            expires_at=now + timedelta(seconds=response.lifetime_seconds),
            obtained_at=now,
            metadata=dict(response.extras),
        )
        if new:
            record = self.registry.register(connection, credential)
            event = self._event(EventType.CONNECTED, record, 0)
        else:
            record, previous = self.registry.reconnect(cid, credential)
            failing = (
                previous.status is ConnectionStatus.NEEDS_REAUTH
                or previous.consecutive_failures > 0
                or previous.at_risk
            )
            event = self._event(
                EventType.RECOVERED if failing else EventType.CONNECTED,
                record,
                previous.consecutive_failures,
            )
        self._announce(event)
        self.log.info(
            "connection authorised",
            connection_id=cid,
            new=new,
            version=record.state.current_version,
            granted_scopes=list(granted),
        )
        return Connected(record, new, granted, missing, event)

    # -- helpers -----------------------------------------------------------------------------

    def _exists(self, connection_id: str) -> bool:
        try:
            self.registry.state.get(connection_id)
        except NotFound:
            return False
        return True

    def _connection_for(
        self,
        session: AuthorizationSession,
        extras: dict[str, str],
        client_secret: Secret | None,
    ) -> tuple[Connection, Secret | None]:
        """The connection the code is exchanged for, and its client secret -- all checked
        before the exchange, so a refusal never costs a code."""
        connection = session.connection
        profile = self.registry.profile_for(connection)
        location = account_location(profile, connection, extras)
        if session.new:
            if self._exists(connection.id):
                raise AlreadyExists(f"connection {connection.id!r} was registered meanwhile")
            connection = replace(connection, params={**connection.params, **location})
            return connection, client_secret
        record = self.registry.state.get(connection.id)
        connection = record.connection
        params = profile.resolve_params(connection.params)
        moved = {k: v for k, v in location.items() if params.get(k) != v}
        if moved:
            name, value = next(iter(moved.items()))
            raise ConfigError(
                f"connection {connection.id!r}: the account is at {name}={value}, not "
                f"{params.get(name)}; remove the connection and connect it again"
            )
        stored = self.registry.secrets.get(connection.id).credential
        return connection, stored.client_secret

    def _event(self, kind: EventType, record: ConnectionRecord, failures: int) -> ConnectionEvent:
        version = record.state.current_version
        created = isoformat(record.connection.created_at) or ""
        return ConnectionEvent(
            type=kind,
            connection_id=record.connection.id,
            occurred_at=self.clock.now(),
            idempotency_key=ConnectionEvent.key_for(
                kind, record.connection.id, f"{created}|v{version}"
            ),
            version=version,
            expires_at=record.state.expires_at,
            consecutive_failures=failures,
        )

    def _announce(self, event: ConnectionEvent) -> None:
        """Parked first (durable, relayed by the next tick), then published at once."""
        self.registry.state.park_events([event])
        try:
            self.events.publish([event])
            self.registry.state.unpark_events([event.event_id])
        except TokenBrokerError as error:
            self.log.warning(
                "event not published yet; the next tick relays it",
                connection_id=event.connection_id,
                error_code=error.code,
            )


__all__ = [
    "DEFAULT_SESSION_TTL",
    "AuthorizationFlow",
    "AuthorizationStart",
    "Connected",
    "DeviceStart",
]
