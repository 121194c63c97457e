"""Building a broker against the test OAuth server, the same way production wiring does."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from tests.support.oidc import sign_rs256, signing_jwks
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


def caller_id_token(oidc: Any, audience: str, email: str, **overrides: Any) -> str:
    """A caller's ID token for an issuer that trusts ``oidc`` (its issuer and JWKS): signed with
    oidc-provider's key, for ``audience``, ``email`` verified, valid for an hour. ``overrides``
    replace claims; an override of ``None`` leaves that claim out."""
    from joserfc.jwk import RSAKey

    jwk = signing_jwks()["keys"][0]
    now = int(time.time())
    claims = {
        "iss": oidc.issuer,
        "aud": audience,
        "sub": f"sub-{email}",
        "email": email,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        **overrides,
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    return sign_rs256(claims, RSAKey.import_key(jwk).raw_value, kid=jwk["kid"])


def request_token(
    url: str, body: Any, id_token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """``POST /token`` to the issuer at ``url`` as the caller ``id_token`` names (with more
    ``headers``, e.g. a trace context)."""
    return httpx.post(
        f"{url}/token",
        json=body,
        headers={"Authorization": f"Bearer {id_token}", **(headers or {})},
        timeout=30,
    )


def tick(runtime: Runtime, **options: Any) -> TickSummary:
    return asyncio.run(runtime.tick(**options))


def outbox(runtime: Runtime) -> list[Any]:
    return [event for _, event in runtime.events.read()]  # type: ignore[attr-defined]


def schemathesis_run(
    url: str,
    tmp_path: Path,
    *,
    token: str,
    operations: str,
    connections: list[str],
    scopes: list[str] | None = None,
    relay_paths: list[str] | None = None,
    max_examples: int = 60,
) -> tuple[int, int, str]:
    """schemathesis against a live issuer, from docs/issuer.openapi.yaml with the test
    policy's real names put in (connection ids, scopes, relay paths) -- generated from the
    bare schema, no request ever matched a grant, so no policy path was exercised. Returns
    (generated, passed, output); the caller asserts."""
    import os
    import re
    import subprocess
    import sys

    import yaml

    from tests.system.processes import REPO

    spec = yaml.safe_load((REPO / "docs" / "issuer.openapi.yaml").read_text())
    request = spec["components"]["schemas"]["TokenRequest"]["properties"]
    request["connection"] = {"type": "string", "enum": connections}
    if scopes is not None:
        request["scopes"]["items"] = {"type": "string", "enum": scopes}
    for parameter in spec["paths"]["/relay/{connection}/{path}"]["parameters"]:
        if parameter["name"] == "connection":
            parameter["schema"] = {"type": "string", "enum": connections}
        elif parameter["name"] == "path" and relay_paths is not None:
            parameter["schema"] = {"type": "string", "enum": relay_paths}
    patched = tmp_path / "issuer.openapi.yaml"
    patched.write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"), "run", str(patched),
            "--url", url,
            "--header", f"Authorization: Bearer {token}",
            "--include-path-regex", operations,
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_headers_conformance,response_schema_conformance",
            "--max-examples", str(max_examples),
            "--request-timeout", "20",
            "--seed", "1",
            "--no-color",
        ],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", output)
    assert counts is not None, output[-3000:]
    return int(counts[1]), int(counts[2]), output
