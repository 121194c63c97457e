"""Wiring: build the adapters the settings select, once, and hand out the services.

Entry points (functions, CLI, local server) build one :class:`Runtime` at cold start and reuse
it for every invocation (as aws-powertools builds long-lived clients at module scope).
Adapters are imported here lazily, per backend, so a function pays only for what it uses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tokenbroker.adapters.http import AiohttpTokenEndpoint
from tokenbroker.entrypoints.settings import LogSettings, Settings
from tokenbroker.kernel.clock import Clock, SystemClock
from tokenbroker.kernel.errors import ConfigError
from tokenbroker.kernel.log import configure_logging
from tokenbroker.kernel.retry import RetryPolicy
from tokenbroker.oauth.profiles import ProviderProfile, load_profiles
from tokenbroker.ports import EventBus, SecretStore, StateStore, TokenEndpoint
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import Refresher, TickSummary


@dataclass
class Runtime:
    settings: Settings
    secrets: SecretStore
    state: StateStore
    events: EventBus
    profiles: Mapping[str, ProviderProfile]
    clock: Clock = field(default_factory=SystemClock)
    #: Whatever must be closed on shutdown (the embedded database).
    resources: list[Any] = field(default_factory=list)

    def refresher(self, **overrides: Any) -> Refresher:
        options: dict[str, Any] = {
            "secrets": self.secrets,
            "state": self.state,
            "events": self.events,
            "profiles": self.profiles,
            "clock": self.clock,
            "policy": self.settings.refresh_policy(),
            "retry": RetryPolicy(
                attempts=self.settings.retry_attempts, base_delay=self.settings.retry_base_delay
            ),
            "lease_ttl": timedelta(seconds=self.settings.lease_ttl_seconds),
            "concurrency": self.settings.concurrency,
        }
        options.update(overrides)
        return Refresher(**options)

    def registry(self) -> ConnectionRegistry:
        """Operator actions on connections (add, reauth, enable/disable, remove)."""
        return ConnectionRegistry(
            secrets=self.secrets, state=self.state, profiles=self.profiles, clock=self.clock
        )

    def token_endpoint(self) -> AiohttpTokenEndpoint:
        return AiohttpTokenEndpoint(
            timeout=self.settings.http_timeout, max_connections=self.settings.concurrency
        )

    async def tick(
        self,
        *,
        connection_ids: Sequence[str] | None = None,
        endpoint: TokenEndpoint | None = None,
        refresher: Refresher | None = None,
        **options: Any,
    ) -> TickSummary:
        """One refresh tick with a fresh HTTP session (sessions belong to one event loop)."""
        refresher = refresher or self.refresher()
        limit = options.pop("limit", self.settings.tick_limit)
        if endpoint is not None:
            return await refresher.tick(
                endpoint, connection_ids=connection_ids, limit=limit, **options
            )
        async with self.token_endpoint() as http:
            return await refresher.tick(http, connection_ids=connection_ids, limit=limit, **options)

    def close(self) -> None:
        for resource in self.resources:
            resource.close()
        self.resources.clear()


def start_logging(*, level: str | None = None, default_level: str = "info") -> LogSettings:
    """Configure the one logger from the settings (an entry point's first act)."""
    settings = LogSettings.from_env(level=level, default_level=default_level)
    configure_logging(settings.level, log_file=settings.file)
    return settings


def build_runtime(settings: Settings | None = None, *, clock: Clock | None = None) -> Runtime:
    """Build the adapters the settings select (a preset, then per-port overrides)."""
    settings = settings or Settings.from_env()
    profiles = load_profiles(settings.profiles_file)
    resources: list[Any] = []
    opened: dict[str, Any] = {}

    def embedded_db() -> Any:
        if "db" not in opened:
            from tokenbroker.adapters.embedded import EmbeddedDatabase  # noqa: PLC0415

            key = settings.encryption_key
            opened["db"] = EmbeddedDatabase(
                settings.resolved_state_dir,
                key=key.reveal() if key else None,
                key_file=settings.encryption_key_file,
            )
            resources.append(opened["db"])
        return opened["db"]

    secret_kind, state_kind, events_kind = settings.adapters
    try:
        secrets = _secret_store(secret_kind, settings, embedded_db)
        state = _state_store(state_kind, settings, embedded_db)
        events = _event_bus(events_kind, settings, embedded_db)
    except BaseException:
        for resource in resources:
            resource.close()
        raise
    return Runtime(settings, secrets, state, events, profiles, clock or SystemClock(), resources)


def _secret_store(kind: str, settings: Settings, embedded_db: Callable[[], Any]) -> SecretStore:
    if kind == "memory":
        from tokenbroker.adapters.memory import MemorySecretStore  # noqa: PLC0415

        return MemorySecretStore(settings.retained_versions)
    if kind == "embedded":
        from tokenbroker.adapters.embedded import EmbeddedSecretStore  # noqa: PLC0415

        return EmbeddedSecretStore(embedded_db(), settings.retained_versions)
    if kind == "secret-manager":
        from tokenbroker.adapters.gcp.secret_manager import (  # noqa: PLC0415
            SecretManagerSecretStore,
        )

        return SecretManagerSecretStore(
            project=settings.project,
            prefix=settings.secret_prefix,
            retained_versions=settings.retained_versions,
            endpoint=settings.secret_manager_endpoint,
        )
    if kind == "aws-secrets-manager":
        from tokenbroker.adapters.aws import AwsSecretsManagerStore  # noqa: PLC0415

        return AwsSecretsManagerStore(
            region=settings.aws_region,
            endpoint_url=settings.aws_endpoint_url,
            prefix=settings.aws_secret_prefix,
            retained_versions=settings.retained_versions,
        )
    raise ConfigError(f"secret store {kind!r} is not available")


def _state_store(kind: str, settings: Settings, embedded_db: Callable[[], Any]) -> StateStore:
    if kind == "memory":
        from tokenbroker.adapters.memory import MemoryStateStore  # noqa: PLC0415

        return MemoryStateStore()
    if kind == "embedded":
        from tokenbroker.adapters.embedded import EmbeddedStateStore  # noqa: PLC0415

        return EmbeddedStateStore(embedded_db())
    if kind == "firestore":
        from tokenbroker.adapters.gcp.firestore import FirestoreStateStore  # noqa: PLC0415

        return FirestoreStateStore(
            project=settings.project,
            database=settings.firestore_database,
            collection=settings.firestore_collection,
            emulator_host=settings.firestore_emulator_host,
        )
    raise ConfigError(f"state store {kind!r} is not available")


def _event_bus(kind: str, settings: Settings, embedded_db: Callable[[], Any]) -> EventBus:
    if kind == "memory":
        from tokenbroker.adapters.memory import MemoryEventBus  # noqa: PLC0415

        return MemoryEventBus()
    if kind == "outbox":
        from tokenbroker.adapters.embedded import EmbeddedOutbox  # noqa: PLC0415

        return EmbeddedOutbox(embedded_db())
    if kind == "pubsub":
        from tokenbroker.adapters.gcp.pubsub import PubSubEventBus  # noqa: PLC0415

        return PubSubEventBus(settings.topic_path)
    raise ConfigError(f"event bus {kind!r} is not available")
