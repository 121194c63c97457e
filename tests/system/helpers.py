"""Building a broker against the test OAuth server, the same way production wiring does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tokenbroker.entrypoints.compose import Runtime, build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.model import ClientAuthMethod, Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret
from tokenbroker.refresh.registry import ConnectionRegistry
from tokenbroker.refresh.tick import TickSummary


def embedded_runtime(state_dir: Path, **settings: Any) -> Runtime:
    options: dict[str, Any] = {"retry_base_delay": 0.05, "http_timeout": 2.0}
    options.update(settings)
    return build_runtime(Settings(backend="embedded", state_dir=state_dir, **options))


def registry(runtime: Runtime) -> ConnectionRegistry:
    return runtime.registry()


def add_refresh_connection(
    runtime: Runtime,
    oidc: Any,
    cid: str,
    *,
    client_id: str,
    client_secret: str,
    auth_method: ClientAuthMethod,
) -> str:
    """Consent once (authorization code + PKCE) and register the refresh token."""
    tokens = oidc.obtain_refresh_token(client_id, client_secret)
    registry(runtime).register(
        Connection(
            id=cid,
            profile="generic",
            grant=GrantType.REFRESH_TOKEN,
            client_id=client_id,
            token_url=oidc.token_url,
            auth_method=auth_method,
        ),
        Credential(
            refresh_token=Secret(tokens["refresh_token"]), client_secret=Secret(client_secret)
        ),
    )
    return str(tokens["refresh_token"])


def tick(runtime: Runtime, **options: Any) -> TickSummary:
    return asyncio.run(runtime.tick(**options))


def outbox(runtime: Runtime) -> list[Any]:
    return [event for _, event in runtime.events.read()]  # type: ignore[attr-defined]
