"""Operator actions on connections: register, re-authorise, disable, remove."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime

from tokenbroker.kernel.clock import Clock
from tokenbroker.kernel.errors import AlreadyExists, ConfigError, NotFound
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
        """Store the first credential version and register the connection, due at once."""
        validate_connection_id(connection.id)
        profile = self.profile_for(connection)
        profile.check_connection(connection)
        check_material(connection, credential)
        try:
            self.state.get(connection.id)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"connection {connection.id!r} already exists")
        now = self.clock.now()
        connection = replace(connection, created_at=connection.created_at or now)
        version = self.secrets.put(connection.id, credential, expected_version=None)
        state = RefreshState(
            status=ConnectionStatus.ACTIVE,
            expires_at=credential.expires_at,
            next_refresh_at=self._first_refresh(connection),
            current_version=version,
        )
        self.state.create(connection, state)
        self.log.info(
            "connection registered", connection_id=connection.id, grant=connection.grant.value
        )
        return ConnectionRecord(connection, state)

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
        )
        # consecutive_failures is kept: the first successful refresh clears it and announces
        # connection.recovered.
        self.state.put_state(connection_id, state)
        self.log.info("connection re-authorised", connection_id=connection_id, version=version)
        return ConnectionRecord(record.connection, state)

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
        self.state.delete(connection_id)
        with contextlib.suppress(NotFound):
            self.secrets.delete(connection_id)
        self.log.info("connection removed", connection_id=connection_id)
