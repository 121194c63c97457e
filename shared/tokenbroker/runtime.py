"""Wiring: build the adapters the settings select, once, and hand out the services.

Entry points (functions, CLI, local server) build one :class:`Runtime` at cold start and reuse
it for every invocation (as aws-powertools builds long-lived clients at module scope).
Adapters are imported here lazily, per backend, so a function pays only for what it uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tokenbroker.adapters.http import AiohttpTokenEndpoint
from tokenbroker.clock import Clock, SystemClock
from tokenbroker.errors import ConfigError
from tokenbroker.oauth.transport import TokenEndpoint
from tokenbroker.ports import EventBus, SecretStore, StateStore
from tokenbroker.profiles import ProviderProfile, load_profiles
from tokenbroker.refresher import Refresher, TickSummary
from tokenbroker.retry import RetryPolicy
from tokenbroker.settings import Settings


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


def build_runtime(settings: Settings | None = None, *, clock: Clock | None = None) -> Runtime:
    settings = settings or Settings.from_env()
    profiles = load_profiles(settings.profiles_file)
    clock = clock or SystemClock()
    if settings.backend == "memory":
        from tokenbroker.adapters.memory import (  # noqa: PLC0415
            MemoryEventBus,
            MemorySecretStore,
            MemoryStateStore,
        )

        return Runtime(
            settings,
            MemorySecretStore(settings.retained_versions),
            MemoryStateStore(),
            MemoryEventBus(),
            profiles,
            clock,
        )
    if settings.backend == "embedded":
        from tokenbroker.adapters.embedded import (  # noqa: PLC0415
            EmbeddedDatabase,
            EmbeddedOutbox,
            EmbeddedSecretStore,
            EmbeddedStateStore,
        )

        db = EmbeddedDatabase(
            settings.resolved_state_dir,
            key=settings.encryption_key.reveal() if settings.encryption_key else None,
            key_file=settings.encryption_key_file,
        )
        return Runtime(
            settings,
            EmbeddedSecretStore(db, settings.retained_versions),
            EmbeddedStateStore(db),
            EmbeddedOutbox(db),
            profiles,
            clock,
            resources=[db],
        )
    raise ConfigError(f"backend {settings.backend!r} is not available")
