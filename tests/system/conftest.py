from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.oidc import OidcServer, start_oidc_server


@pytest.fixture(scope="session")
def oidc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """One oidc-provider for the session, with refresh-token rotation and reuse detection."""
    server = start_oidc_server(tmp_path_factory, access_token_ttl=300)
    yield server
    server.stop()


@pytest.fixture
def oidc(oidc_server: OidcServer) -> OidcServer:
    oidc_server.clear_faults()
    oidc_server.reset_stats()
    return oidc_server
