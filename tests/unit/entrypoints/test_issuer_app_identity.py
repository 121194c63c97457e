"""The issuer function in process in ``platform`` mode (issue 9, item 5): the HTTP edge takes
the caller from the header Cloud Run checked, for ``/token`` and for the relay, and neither
credential header reaches a relayed provider."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.jwks_server import JwksServer
from tests.support.oidc import rsa_public_jwk
from tests.unit.entrypoints import test_issuer_app as app
from tests.unit.entrypoints.test_issuer_app import (
    BILLING,
    CRM_TOKEN,
    KEY,
    KID,
    OMIE_SECRET,
    WORKER,
    Deployment,
    error_of,
    id_token,
)

# The same deployment as test_issuer_app.py (its fixture), in another identity mode, with a
# keys server whose answers after the first take SLOW_SECONDS.
serve = app.serve
SLOW_SECONDS = 1.5


@pytest.fixture
def slow_keys() -> Iterator[JwksServer]:
    with JwksServer({"keys": [rsa_public_jwk(KEY, KID)]}, delay=SLOW_SECONDS, prompt=1) as server:
        yield server


@pytest.fixture
def keys_url(slow_keys: JwksServer) -> str:
    """Overrides test_issuer_app.py's: the deployment fetches from the slow server."""
    return slow_keys.url


REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"


def delivered(email: str = WORKER, **overrides: Any) -> str:
    header, payload, _ = id_token(email, **overrides).split(".")
    return f"{header}.{payload}.{REMOVED}"


def forged(email: str) -> str:
    """Made up by the caller: any claims, no signature, dressed as a delivered token."""
    header, payload, _ = id_token(email).split(".")
    return f"{header}.{payload}.{REMOVED}"


PLATFORM = {"TOKENBROKER_CALLER_IDENTITY": "platform"}


def test_token_route_takes_the_header_cloud_run_checked(serve: Callable[..., None]) -> None:
    async def scenario(d: Deployment) -> None:
        via_serverless = await d.token(
            {"connection": "crm"}, {"X-Serverless-Authorization": f"Bearer {delivered()}"}
        )
        assert via_serverless.status_code == 200, via_serverless.text
        assert via_serverless.json()["access_token"] == CRM_TOKEN
        via_authorization = await d.token(
            {"connection": "crm"}, {"Authorization": f"Bearer {delivered()}"}
        )
        assert via_authorization.status_code == 200, via_authorization.text
        # The worker's real invoker token in X-Serverless-Authorization, a forged one for the
        # billing account in Authorization: the worker it is (billing has no crm grant; the
        # worker does), so the forged header was not read.
        mixed = {
            "Authorization": f"Bearer {forged(BILLING)}",
            "X-Serverless-Authorization": f"Bearer {delivered()}",
        }
        assert (await d.token({"connection": "crm"}, mixed)).status_code == 200
        signed = await d.token({"connection": "crm"}, {"Authorization": f"Bearer {id_token()}"})
        assert (signed.status_code, error_of(signed)) == (401, "invalid_token")

    serve(scenario, **PLATFORM)


def test_relay_takes_the_header_cloud_run_checked_and_forwards_neither(
    serve: Callable[..., None],
) -> None:
    async def scenario(d: Deployment) -> None:
        async def relay(headers: dict[str, str]) -> Any:
            return await d.client.post(
                "/relay/omie/geral/clientes/", json={"call": "ListarClientes"}, headers=headers
            )

        real_billing = f"Bearer {delivered(BILLING)}"
        # The worker may invoke the function but has no relay grant; it forges billing in
        # Authorization next to its own real invoker token: refused as the worker.
        smuggled = await relay(
            {"Authorization": f"Bearer {forged(BILLING)}",
             "X-Serverless-Authorization": f"Bearer {delivered()}"}
        )  # fmt: skip
        assert (smuggled.status_code, error_of(smuggled)) == (403, "access_denied")
        assert d.api.received == []
        ok = await relay({"X-Serverless-Authorization": real_billing, "Authorization": "Bearer x"})
        assert ok.status_code == 200, ok.text
        (arrived,) = d.api.received
        assert arrived.header("authorization") == []
        assert arrived.header("x-serverless-authorization") == []
        assert json.loads(arrived.body)["app_secret"] == OMIE_SECRET
        assert OMIE_SECRET not in ok.text

    serve(scenario, **PLATFORM)


def test_an_unknown_kid_on_the_relay_does_not_stall_the_function(
    serve: Callable[..., None], slow_keys: JwksServer
) -> None:
    """Verify mode: the relay's caller check fetches keys off the event loop too."""

    async def scenario(d: Deployment) -> None:
        warm = await d.client.get("/relay/crm-api/v2/contacts", headers=app.auth())
        assert warm.status_code == 200, warm.text  # cold start done, keys cached
        header = base64.urlsafe_b64encode(
            json.dumps({"alg": "RS256", "kid": "rotated-in", "typ": "JWT"}).encode()
        ).rstrip(b"=")
        _, payload, signature = id_token().split(".")
        unknown = f"Bearer {header.decode()}.{payload}.{signature}"
        started = time.monotonic()
        stalled = asyncio.ensure_future(
            d.client.get("/relay/crm-api/v2/contacts", headers={"Authorization": unknown})
        )
        await asyncio.sleep(0.1)
        health = await d.client.get("/healthz")
        health_took = time.monotonic() - started
        other = await d.client.get("/relay/crm-api/v2/contacts", headers=app.auth())
        other_took = time.monotonic() - started
        refused = await stalled
        assert health.status_code == 200 and other.status_code == 200, other.text
        assert health_took < 0.5 and other_took < 0.8, (health_took, other_took)
        assert time.monotonic() - started >= SLOW_SECONDS * 0.9
        assert (refused.status_code, error_of(refused)) == (401, "invalid_token")
        assert slow_keys.requests == 2

    serve(scenario)
