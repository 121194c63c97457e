"""Operator actions on connections: register, re-authorise, disable, remove."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from tokenbroker.kernel.clock import Clock
from tokenbroker.kernel.errors import AlreadyExists, ConfigError, NotFound, VersionConflict
from tokenbroker.kernel.log import get_logger
from tokenbroker.kernel.model import (
    UNREFRESHED_GRANTS,
    Connection,
    ConnectionRecord,
    ConnectionStatus,
    Credential,
    RefreshState,
    validate_connection_id,
)
from tokenbroker.kernel.secret import Secret
from tokenbroker.oauth.acquire import check_material
from tokenbroker.oauth.profiles import ProviderProfile
from tokenbroker.ports import SecretStore, StateStore

#: ``last_error`` of a record whose registration has not finished (or crashed).
INCOMPLETE = "registration incomplete"


class ConnectionRegistry:
    def __init__(
        self,
        *,
        secrets: SecretStore,
        state: StateStore,
        profiles: Mapping[str, ProviderProfile],
        clock: Clock,
    ) -> None:
        self.secrets = secrets
        self.state = state
        self.profiles = profiles
        self.clock = clock
        self.log = get_logger(component="registry")

    def profile_for(self, connection: Connection) -> ProviderProfile:
        try:
            return self.profiles[connection.profile]
        except KeyError:
            known = ", ".join(sorted(self.profiles))
            raise ConfigError(
                f"profile: {connection.profile!r} is not a known profile (known: {known})"
            ) from None

    def _first_refresh(self, connection: Connection) -> datetime | None:
        """Due at once, unless nothing about the connection ever expires."""
        return None if connection.grant in UNREFRESHED_GRANTS else self.clock.now()

    def register(self, connection: Connection, credential: Credential) -> ConnectionRecord:
        """Register the connection and store its first credential version, due at once.

        Two stores, three writes, in an order that a failure or a crash at any point leaves
        clearable (``remove`` clears every leftover; ``add`` then starts afresh):

        1. ``state.create`` a placeholder -- not due, no version, ``last_error`` says the
           registration is incomplete. Creating the record is atomic, so it also makes this call
           the id's only owner: a concurrent ``add`` of the same id gets ``AlreadyExists``.
        2. ``secrets.put`` the first version. A secret already there belongs to no record (an
           older broker wrote the secret first and crashed): as the id's owner we destroy it.
        3. ``state.put_state`` the real state (active, due, pointing at the version).

        A failure (an ``Exception``) after step 1 undoes what was written; a crash cannot, and
        leaves a visible, not-due placeholder that ``remove`` clears.
        """
        validate_connection_id(connection.id)
        profile = self.profile_for(connection)
        profile.check_connection(connection)
        check_material(connection, credential)
        now = self.clock.now()
        connection = replace(connection, created_at=connection.created_at or now)
        placeholder = RefreshState(status=ConnectionStatus.ACTIVE, last_error=INCOMPLETE)
        try:
            self.state.create(connection, placeholder)
        except AlreadyExists:
            record = self.state.get(connection.id)
            hint = (
                " (an earlier add did not finish: remove it first)" if _incomplete(record) else ""
            )
            raise AlreadyExists(f"connection {connection.id!r} already exists{hint}") from None
        try:
            version = self._put_first(connection.id, credential)
            state = RefreshState(
                status=ConnectionStatus.ACTIVE,
                expires_at=credential.expires_at,
                next_refresh_at=self._first_refresh(connection),
                current_version=version,
            )
            self.state.put_state(connection.id, state)
        except Exception:
            self._undo_register(connection.id)
            raise
        self.log.info(
            "connection registered", connection_id=connection.id, grant=connection.grant.value
        )
        return ConnectionRecord(connection, state)

    def _put_first(self, connection_id: str, credential: Credential) -> int:
        try:
            return self.secrets.put(connection_id, credential, expected_version=None)
        except VersionConflict:
            self.log.warning("destroying an orphaned secret", connection_id=connection_id)
            self.secrets.delete(connection_id)
            return self.secrets.put(connection_id, credential, expected_version=None)

    def _undo_register(self, connection_id: str) -> None:
        """Best effort: whatever is left is a placeholder that ``remove`` clears."""
        for undo in (self.secrets.delete, self.state.delete):
            try:
                undo(connection_id)
            except NotFound:
                pass
            except Exception:  # noqa: BLE001 - the original error is the one to raise
                self.log.warning(
                    "could not undo a failed registration; remove the connection",
                    connection_id=connection_id,
                )
                return

    def reauthorize(
        self,
        connection_id: str,
        *,
        refresh_token: Secret | None = None,
        client_secret: Secret | None = None,
        private_key: Secret | None = None,
    ) -> ConnectionRecord:
        """Store new material (e.g. a refresh token from a new consent) and make the
        connection active and due at once."""
        record = self.state.get(connection_id)
        current = self.secrets.get(connection_id)
        old = current.credential
        credential = replace(
            old,
            refresh_token=refresh_token or old.refresh_token,
            client_secret=client_secret or old.client_secret,
            private_key=private_key or old.private_key,
        )
        check_material(record.connection, credential)
        version = self.secrets.put(connection_id, credential, expected_version=current.version)
        state = replace(
            record.state,
            status=ConnectionStatus.ACTIVE,
            next_refresh_at=self._first_refresh(record.connection),
            current_version=version,
            # New material answers any refresh whose outcome was unknown.
            intent=None,
            at_risk=False,
        )
        # consecutive_failures is kept: the first successful refresh clears it and announces
        # connection.recovered.
        self.state.put_state(connection_id, state)
        self.log.info("connection re-authorised", connection_id=connection_id, version=version)
        return ConnectionRecord(record.connection, state)

    def reconnect(
        self, connection_id: str, credential: Credential
    ) -> tuple[ConnectionRecord, RefreshState]:
        """Store what a new consent gave (refresh token, first access token) as the next
        version and make the connection active with a clean failure history; returns the new
        record and the state it replaced (the caller announces a recovery from it).

        Unlike :meth:`reauthorize` (new material, refreshed next) the credential is complete:
        the flow's code exchange was its first refresh, so the failures end here. The static
        material (client secret, key) the stored credential holds is kept unless given."""
        record = self.state.get(connection_id)
        current = self.secrets.get(connection_id)
        old = current.credential
        credential = replace(
            credential,
            client_secret=credential.client_secret or old.client_secret,
            private_key=credential.private_key or old.private_key,
        )
        check_material(record.connection, credential)
        version = self.secrets.put(connection_id, credential, expected_version=current.version)
        state = replace(
            record.state,
            status=ConnectionStatus.ACTIVE,
            expires_at=credential.expires_at,
            next_refresh_at=self._first_refresh(record.connection),
            last_refresh_at=credential.obtained_at,
            consecutive_failures=0,
            last_error=None,
            current_version=version,
            intent=None,
            at_risk=False,
        )
        self.state.put_state(connection_id, state)
        self.log.info("connection re-connected", connection_id=connection_id, version=version)
        return ConnectionRecord(record.connection, state), record.state

    def set_enabled(self, connection_id: str, enabled: bool) -> ConnectionRecord:
        record = self.state.get(connection_id)
        status = ConnectionStatus.ACTIVE if enabled else ConnectionStatus.DISABLED
        state = replace(
            record.state,
            status=status,
            next_refresh_at=(
                self._first_refresh(record.connection) if enabled else record.state.next_refresh_at
            ),
        )
        self.state.put_state(connection_id, state)
        return ConnectionRecord(record.connection, state)

    def remove(self, connection_id: str) -> None:
        """Forget the connection and destroy its secret. The record goes first, so nothing
        refreshes a connection whose secret is being destroyed; a secret left by a failure or
        a crash (or by an older broker) is destroyed by the next ``remove``. NotFound only when
        neither exists."""
        found = False
        try:
            self.state.delete(connection_id)
            found = True
        except NotFound:
            pass
        try:
            self.secrets.delete(connection_id)
            found = True
        except NotFound:
            pass
        if not found:
            raise NotFound(f"connection {connection_id!r} not found")
        self.log.info("connection removed", connection_id=connection_id)


def _incomplete(record: ConnectionRecord) -> bool:
    return record.state.current_version is None and record.state.last_error == INCOMPLETE
