"""The production IAM Credentials adapter (Google's ``google-cloud-iam`` client on its REST
transport, driven by ``tokenbroker.adapters.gcp.iam_credentials``) against the local
``generateAccessToken`` server.

What the issuer relies on: a token with exactly the requested scopes and a bounded lifetime;
bad requests refused before anything is sent; each IAM answer classified the way the issuer
needs (docstring table of ``tokenbroker.adapters.gcp.iam_credentials``); the broker's own token
sent as ``Bearer`` and never seen in an error or a log line. The default authorizer
(Application Default Credentials) cannot run here (no ADC), so its plumbing is exercised with a
fake ``google.auth.default``; the client code above it is the production code.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import google.auth
import google.auth.exceptions
import httpx
import pytest

from tests.support.iamcredentials_server import Fault, IamCredentialsTestServer
from tokenbroker.adapters.gcp.iam_credentials import (
    CLOUD_PLATFORM_SCOPE,
    ApplicationDefaultAuthorizer,
    BrokerUnauthenticated,
    IamCredentials,
    IamCredentialsError,
    IamUnavailable,
    ImpersonationDenied,
    ImpersonationMisconfigured,
    ImpersonationRequestInvalid,
    ServiceAccountGone,
)
from tokenbroker.kernel.clock import FakeClock
from tokenbroker.kernel.errors import (
    BadRequest,
    ConfigError,
    CredentialUnavailable,
    NeedsReauth,
    TokenBrokerError,
)
from tokenbroker.kernel.model import MintedToken
from tokenbroker.kernel.retry import RetryPolicy, call_with_retries
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

SA = "reports-reader@acme-prod.iam.gserviceaccount.com"
OTHER_SA = "billing-writer@acme-prod.iam.gserviceaccount.com"
# Lower case, digits and dashes: the log scrubber's token patterns do not match it, so a leak of
# this value would show up in the scans below rather than being hidden by redaction.
BROKER_TOKEN = "broker-own-token-5d41402abc4b2a76b9719d911017c592"
DRIVE_RO = "https://www.googleapis.com/auth/drive.readonly"
SHEETS_RO = "https://www.googleapis.com/auth/spreadsheets.readonly"
RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z")


@pytest.fixture(scope="session")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ledger of every token the test servers minted, for the leak scans."""
    return tmp_path_factory.mktemp("iamcredentials") / "iamcredentials-token-ledger.txt"


@pytest.fixture
def iam(ledger_path: Path) -> Iterator[IamCredentialsTestServer]:
    with IamCredentialsTestServer(ledger_path) as server:
        server.allow(BROKER_TOKEN, SA)
        server.add_service_account(OTHER_SA)
        yield server


async def broker_token() -> str:
    return BROKER_TOKEN


def mint(
    server: IamCredentialsTestServer,
    service_account: str = SA,
    scopes: Any = (DRIVE_RO,),
    lifetime: Any = 900,
    delegates: Sequence[str] = (),
    **options: Any,
) -> MintedToken:
    options.setdefault("authorizer", broker_token)

    async def go() -> MintedToken:
        async with IamCredentials(endpoint=server.url, **options) as client:
            return await client.generate_access_token(service_account, scopes, lifetime, delegates)

    return asyncio.run(go())


def mint_error(server: IamCredentialsTestServer, **kwargs: Any) -> IamCredentialsError:
    with pytest.raises(IamCredentialsError) as caught:
        mint(server, **kwargs)
    return caught.value


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- exact scopes, bounded lifetime -----------------------------------------------------------


def test_mints_a_token_with_exactly_the_requested_scopes_and_lifetime(
    iam: IamCredentialsTestServer,
) -> None:
    before = datetime.now(UTC)
    token = mint(iam, scopes=[DRIVE_RO, SHEETS_RO], lifetime=900)

    [issued] = iam.issued
    assert issued.service_account == SA
    assert issued.scopes == (DRIVE_RO, SHEETS_RO)
    assert issued.lifetime_seconds == 900
    assert issued.delegates == ()
    assert token.access_token == Secret(issued.access_token)
    assert token.expires_at.tzinfo is not None
    assert abs((token.expires_at - (before + timedelta(seconds=900))).total_seconds()) <= 5
    [request] = iam.requests
    assert request.method == "POST"
    # Google's client percent-encodes the "@" of the resource name in the path (as it does for
    # every GAPIC REST call); the service, and the local server, decode path parameters.
    assert unquote(request.path) == f"/v1/projects/-/serviceAccounts/{SA}:generateAccessToken"
    # Direct request: no "delegates" key at all ([REF]: "do not specify this field").
    assert request.body == {"scope": [DRIVE_RO, SHEETS_RO], "lifetime": "900s"}
    assert request.bearer == BROKER_TOKEN


@pytest.mark.parametrize("lifetime", [1, 60, 3600])
def test_lifetime_bounds_are_honoured(iam: IamCredentialsTestServer, lifetime: int) -> None:
    before = datetime.now(UTC)
    token = mint(iam, lifetime=lifetime)
    assert iam.issued[0].lifetime_seconds == lifetime
    assert abs((token.expires_at - (before + timedelta(seconds=lifetime))).total_seconds()) <= 5


@pytest.mark.parametrize("lifetime", [0, -1, 3601, 7200, 43200, 900.0, True, "900"])
def test_lifetime_outside_1_to_3600_is_refused_before_any_request(
    iam: IamCredentialsTestServer, lifetime: Any
) -> None:
    error = mint_error(iam, lifetime=lifetime)
    assert isinstance(error, ImpersonationRequestInvalid)
    assert isinstance(error, BadRequest)
    assert (error.code, error.http_status, error.retryable) == ("invalid_request", 400, False)
    assert iam.request_count == 0


@pytest.mark.parametrize(
    "scopes", [[], (), DRIVE_RO, [DRIVE_RO, ""], [f"{DRIVE_RO} {SHEETS_RO}"], [None]]
)
def test_bad_scopes_are_refused_before_any_request(
    iam: IamCredentialsTestServer, scopes: Any
) -> None:
    error = mint_error(iam, scopes=scopes)
    assert isinstance(error, ImpersonationRequestInvalid)
    assert iam.request_count == 0


@pytest.mark.parametrize(
    "service_account",
    [
        "not-an-email",
        "someone@gmail.com",
        f"{SA}/../../x",
        f"projects/-/serviceAccounts/{SA}",
        f"{SA}:signBlob",
        f"{SA}?alt=media",
        f"{SA}#x",
        "",
    ],
)
def test_malformed_service_account_is_refused_before_any_request(
    iam: IamCredentialsTestServer, service_account: str
) -> None:
    error = mint_error(iam, service_account=service_account)
    assert isinstance(error, ImpersonationMisconfigured)
    assert isinstance(error, ConfigError)
    assert not error.retryable
    assert iam.request_count == 0


def test_longer_lifetime_needs_both_the_client_option_and_the_org_policy(
    iam: IamCredentialsTestServer, ledger_path: Path
) -> None:
    # The client allows it (the deployment says an org policy extends the limit), but IAM
    # without that policy refuses: 400 INVALID_ARGUMENT, the caller's request cannot be granted.
    error = mint_error(iam, lifetime=7200, max_lifetime_seconds=43200)
    assert isinstance(error, ImpersonationRequestInvalid)
    assert (error.rpc_status, error.upstream_status, error.retryable) == (
        "INVALID_ARGUMENT",
        400,
        False,
    )
    assert iam.request_count == 1

    with IamCredentialsTestServer(ledger_path, max_lifetime_seconds=43200) as extended:
        extended.allow(BROKER_TOKEN, SA)
        before = datetime.now(UTC)
        token = mint(extended, lifetime=7200, max_lifetime_seconds=43200)
    assert abs((token.expires_at - (before + timedelta(seconds=7200))).total_seconds()) <= 5
    with pytest.raises(ValueError, match="43200"):
        IamCredentials(max_lifetime_seconds=43201, authorizer=broker_token)


# --- error mapping --------------------------------------------------------------------------------


def test_permission_denied_is_a_permanent_configuration_error(
    iam: IamCredentialsTestServer,
) -> None:
    error = mint_error(iam, service_account=OTHER_SA)  # exists, but no Token Creator grant
    assert isinstance(error, ImpersonationDenied)
    assert isinstance(error, ConfigError)
    assert (error.code, error.http_status, error.retryable) == ("invalid_config", 500, False)
    assert (error.rpc_status, error.upstream_status) == ("PERMISSION_DENIED", 403)
    assert OTHER_SA in error.message
    assert "roles/iam.serviceAccountTokenCreator" in error.message
    assert "(or it may not exist)" in error.message  # the server's own text is kept
    assert iam.issued == []


def test_deleted_service_account_needs_a_human(iam: IamCredentialsTestServer) -> None:
    iam.delete_service_account(SA)
    error = mint_error(iam)
    assert isinstance(error, ServiceAccountGone)
    assert isinstance(error, NeedsReauth)
    assert (error.code, error.http_status, error.retryable) == ("needs_reauth", 409, False)
    assert (error.rpc_status, error.upstream_status) == ("NOT_FOUND", 404)
    assert SA in error.message


def test_refused_broker_token_is_a_configuration_error_after_one_request(
    iam: IamCredentialsTestServer,
) -> None:
    async def unknown_token() -> str:
        return "broker-token-that-iam-does-not-know-0001"

    error = mint_error(iam, authorizer=unknown_token)
    assert isinstance(error, BrokerUnauthenticated)
    assert isinstance(error, ConfigError)
    assert not isinstance(error, CredentialUnavailable)
    assert (error.code, error.http_status, error.retryable) == ("invalid_config", 500, False)
    assert (error.rpc_status, error.upstream_status) == ("UNAUTHENTICATED", 401)
    # A plain callable cannot be told to drop its token: retrying the same token is pointless.
    assert iam.request_count == 1
    assert "broker-token-that-iam-does-not-know" not in f"{error} {error!r} {error.args}"


class RotatingAuthorizer:
    """An authorizer that can be told its token was refused, as the ADC one can."""

    def __init__(self, *tokens: str) -> None:
        self.tokens = list(tokens)
        self.invalidations = 0

    async def __call__(self) -> str:
        return self.tokens[0]

    def invalidate(self) -> None:
        self.invalidations += 1
        if len(self.tokens) > 1:
            self.tokens.pop(0)


def test_a_401_invalidates_the_broker_token_and_retries_once(
    iam: IamCredentialsTestServer,
) -> None:
    authorizer = RotatingAuthorizer("stale-broker-token-000000000001", BROKER_TOKEN)
    mint(iam, authorizer=authorizer)
    assert authorizer.invalidations == 1
    assert [r.status for r in iam.requests] == [401, 200]
    assert iam.requests[1].bearer == BROKER_TOKEN

    iam.clear()
    still_bad = RotatingAuthorizer("stale-broker-token-000000000002", "revoked-broker-token-00003")
    error = mint_error(iam, authorizer=still_bad)
    assert isinstance(error, BrokerUnauthenticated)
    assert [r.status for r in iam.requests] == [401, 401]  # once, never a loop


@pytest.mark.parametrize(
    ("status", "rpc_status"),
    [
        (503, "UNAVAILABLE"),
        (500, "INTERNAL"),
        (429, "RESOURCE_EXHAUSTED"),
        (504, "DEADLINE_EXCEEDED"),
    ],
)
def test_transient_answers_are_retryable_and_carry_retry_after(
    iam: IamCredentialsTestServer, status: int, rpc_status: str
) -> None:
    iam.faults([Fault(status=status, retry_after="7")])
    error = mint_error(iam)
    assert isinstance(error, IamUnavailable)
    assert isinstance(error, CredentialUnavailable)
    assert (error.code, error.http_status, error.retryable) == (
        "temporarily_unavailable",
        503,
        True,
    )
    assert error.retry_after == 7.0
    assert (error.rpc_status, error.upstream_status) == (rpc_status, status)
    mint(iam)  # the fault is spent: the next call works
    assert iam.status_counts == {status: 1, 200: 1}


def test_retry_info_detail_is_honoured_without_a_retry_after_header(
    iam: IamCredentialsTestServer,
) -> None:
    iam.faults([Fault(status=503, retry_delay="12.5s")])
    error = mint_error(iam)
    assert isinstance(error, IamUnavailable)
    assert error.retry_after == 12.5


@pytest.mark.parametrize(
    ("fault", "what"),
    [
        (Fault(status=502, body="html"), "HTTP 502"),
        (Fault(status=503, body="empty"), "HTTP 503"),
        (Fault(status=200, body="html"), "without a JSON object"),
        (Fault(status=200, body="empty"), "without a JSON object"),
    ],
)
def test_non_json_answers_are_transient(
    iam: IamCredentialsTestServer, fault: Fault, what: str
) -> None:
    iam.faults([fault])
    error = mint_error(iam)
    assert isinstance(error, IamUnavailable)
    assert error.retryable
    assert error.rpc_status is None
    assert what in error.message


def test_transient_failures_compose_with_the_retry_policy(iam: IamCredentialsTestServer) -> None:
    iam.faults([Fault(503, retry_after="2"), Fault(429, retry_after="3")])
    clock = FakeClock()

    async def go() -> tuple[MintedToken, int]:
        async with IamCredentials(endpoint=iam.url, authorizer=broker_token) as client:
            return await call_with_retries(
                lambda: client.generate_access_token(SA, [DRIVE_RO], 600),
                RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0),
                clock,
                random.Random(7),
            )

    token, attempts = asyncio.run(go())
    assert attempts == 3
    assert clock.sleeps == [2.0, 3.0]  # Retry-After is a floor on the backoff
    assert token.access_token == Secret(iam.issued[0].access_token)


def test_a_timeout_is_transient(iam: IamCredentialsTestServer) -> None:
    iam.faults([Fault(status=None, delay=1.5)])
    started = time.monotonic()
    error = mint_error(iam, timeout=0.3)
    assert time.monotonic() - started < 1.4
    assert isinstance(error, IamUnavailable)
    assert error.retryable
    assert error.upstream_status is None
    assert "timed out" in error.message


def test_an_unreachable_endpoint_is_transient() -> None:
    async def go() -> None:
        url = f"http://127.0.0.1:{free_port()}"
        async with IamCredentials(endpoint=url, authorizer=broker_token, timeout=2) as client:
            await client.generate_access_token(SA, [DRIVE_RO], 600)

    with pytest.raises(IamUnavailable, match="unreachable") as caught:
        asyncio.run(go())
    assert caught.value.retryable


# --- delegation chains ------------------------------------------------------------------------


def test_delegation_chain_each_link_needs_token_creator(iam: IamCredentialsTestServer) -> None:
    first = "hop-one@acme-ops.iam.gserviceaccount.com"
    second = "hop-two@acme-ops.iam.gserviceaccount.com"
    target = "warehouse@acme-data.iam.gserviceaccount.com"
    iam.allow(BROKER_TOKEN, first)
    iam.allow(first, second)
    iam.allow(second, target)

    mint(iam, service_account=target, delegates=[first, f"projects/-/serviceAccounts/{second}"])
    [issued] = iam.issued
    assert (issued.service_account, issued.delegates) == (target, (first, second))
    assert iam.requests[0].body["delegates"] == [
        f"projects/-/serviceAccounts/{first}",
        f"projects/-/serviceAccounts/{second}",
    ]

    iam.revoke(second, target)
    assert isinstance(
        mint_error(iam, service_account=target, delegates=[first, second]), ImpersonationDenied
    )
    unknown = "ghost@acme-ops.iam.gserviceaccount.com"
    assert isinstance(
        mint_error(iam, service_account=target, delegates=[unknown]), ServiceAccountGone
    )
    count = iam.request_count
    for bad in (f"projects/acme-ops/serviceAccounts/{first}", "hop-one", DRIVE_RO):
        error = mint_error(iam, service_account=target, delegates=[bad])
        assert isinstance(error, ImpersonationMisconfigured)
    assert isinstance(mint_error(iam, service_account=target, delegates=first), BadRequest)
    assert iam.request_count == count


# --- the client's plumbing --------------------------------------------------------------------


def test_concurrent_calls_share_one_library_client(iam: IamCredentialsTestServer) -> None:
    async def go() -> tuple[list[MintedToken], bool]:
        async with IamCredentials(endpoint=iam.url, authorizer=broker_token) as client:
            first = await client.generate_access_token(SA, [DRIVE_RO], 299)
            library_client = client._client
            tokens = await asyncio.gather(
                *(client.generate_access_token(SA, [DRIVE_RO], 300 + i) for i in range(25))
            )
            return [first, *tokens], library_client is not None and client._client is library_client

    tokens, same_client = asyncio.run(go())
    assert same_client
    assert len({t.access_token.reveal() for t in tokens}) == 26
    assert sorted(t.lifetime_seconds for t in iam.issued) == [299 + i for i in range(26)]


def test_concurrent_first_calls_build_one_library_client(
    iam: IamCredentialsTestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenbroker.adapters.gcp import iam_credentials

    builds: list[str] = []
    real = iam_credentials._new_library_client

    def counted(endpoint: str) -> Any:
        builds.append(endpoint)
        return real(endpoint)

    monkeypatch.setattr(iam_credentials, "_new_library_client", counted)

    async def go() -> None:
        async with IamCredentials(endpoint=iam.url, authorizer=broker_token) as client:
            await asyncio.gather(
                *(client.generate_access_token(SA, [DRIVE_RO], 300) for _ in range(10))
            )

    asyncio.run(go())
    assert builds == [iam.url]
    assert len(iam.issued) == 10


def test_the_event_loop_keeps_running_while_iam_answers(iam: IamCredentialsTestServer) -> None:
    """The sync client runs in worker threads: a slow IAM never stalls the loop."""
    iam.faults([Fault(status=None, delay=0.6)])

    async def go() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            async with IamCredentials(endpoint=iam.url, authorizer=broker_token) as client:
                await client.generate_access_token(SA, [DRIVE_RO], 300)
        finally:
            task.cancel()
        return ticks

    assert asyncio.run(go()) >= 20  # ~60 ticks in 0.6 s; a blocked loop would tick ~once
    assert len(iam.issued) == 1


def test_a_client_serves_successive_event_loops_and_aclose_starts_afresh(
    iam: IamCredentialsTestServer,
) -> None:
    client = IamCredentials(endpoint=iam.url, authorizer=broker_token)

    async def mint_and_close() -> bool:
        await client.generate_access_token(SA, [DRIVE_RO], 300)
        built = client._client is not None and client._executor is not None
        await client.aclose()
        return built and client._client is None and client._executor is None

    assert asyncio.run(mint_and_close())
    assert asyncio.run(mint_and_close())  # a new loop, a new library client
    assert len(iam.issued) == 2


# ("google" and "google.cloud" are namespace packages that site-packages' .pth files preload.)
_HEAVY = (
    "aiohttp",
    "google.auth",
    "google.api_core",
    "google.cloud.iam_credentials_v1",
    "google.protobuf",
    "grpc",
    "requests",
)


def _loaded_heavy_modules(code: str, *, with_stderr: bool = False) -> Any:
    """Which of ``_HEAVY`` a fresh interpreter has loaded after running ``code``."""
    script = (
        f"{code}\nimport sys\n"
        f"print(sorted({{h for h in {_HEAVY!r} for m in sys.modules "
        "if m == h or m.startswith(h + '.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = eval(out.stdout.strip())  # noqa: S307 - our own subprocess's list
    return (loaded, out.stderr) if with_stderr else loaded


def test_a_cold_start_that_never_impersonates_imports_no_client_library() -> None:
    assert _loaded_heavy_modules("import tokenbroker.adapters.gcp.iam_credentials") == []
    built = (
        "from tokenbroker.adapters.gcp.iam_credentials import IamCredentials\n"
        "client = IamCredentials(endpoint='http://127.0.0.1:9')"
    )
    assert _loaded_heavy_modules(built) == []


def test_the_first_impersonation_imports_the_client_library_off_the_event_loop(
    iam: IamCredentialsTestServer,
) -> None:
    """The check above looks for the right names: they appear once a token is minted. The
    import (hundreds of ms) happens in a worker thread: the loop keeps ticking meanwhile."""
    code = (
        "import asyncio, sys, time\n"
        "from tokenbroker.adapters.gcp.iam_credentials import IamCredentials\n"
        "async def token() -> str:\n"
        f"    return {BROKER_TOKEN!r}\n"
        "async def go() -> None:\n"
        "    ticks = 0\n"
        "    async def ticker() -> None:\n"
        "        nonlocal ticks\n"
        "        while True:\n"
        "            await asyncio.sleep(0.005)\n"
        "            ticks += 1\n"
        "    task = asyncio.create_task(ticker())\n"
        "    await asyncio.sleep(0)\n"
        "    started = time.monotonic()\n"
        f"    async with IamCredentials(endpoint={iam.url!r}, authorizer=token) as client:\n"
        f"        await client.generate_access_token({SA!r}, [{DRIVE_RO!r}], 300)\n"
        "    task.cancel()\n"
        "    print(ticks, time.monotonic() - started, file=sys.stderr)\n"
        "asyncio.run(go())"
    )
    loaded, stderr = _loaded_heavy_modules(code, with_stderr=True)
    assert {"google.cloud.iam_credentials_v1", "google.api_core", "google.auth"} <= set(loaded)
    assert "aiohttp" not in loaded
    ticks, elapsed = stderr.split()[-2:]
    # A loop blocked by the import would tick about once; a free one every few ms (less often
    # than every 5 ms, as the importing thread holds the GIL much of the time).
    assert int(ticks) >= max(5, float(elapsed) / 0.1), stderr
    assert len(iam.issued) == 1


# --- the broker's own token: Application Default Credentials, with a fake google-auth --------


class FakeAdcCredentials:
    """google-auth's credentials surface the authorizer uses: ``valid``, ``token``, ``refresh``."""

    def __init__(self, *tokens: str, error: Exception | None = None) -> None:
        self._tokens = list(tokens)
        self._error = error
        self.token: str | None = None
        self.expired = False
        self.refresh_threads: list[int] = []
        self.requests: list[Any] = []

    @property
    def valid(self) -> bool:
        return self.token is not None and not self.expired

    def refresh(self, request: Any) -> None:
        self.refresh_threads.append(threading.get_ident())
        self.requests.append(request)
        if self._error is not None:
            raise self._error
        self.token = self._tokens.pop(0) if len(self._tokens) > 1 else self._tokens[0]
        self.expired = False


@dataclass
class FakeAdc:
    """What ``google.auth.default`` returns (or raises), and the calls made to it."""

    credentials: Any = None
    calls: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def fake_adc(monkeypatch: pytest.MonkeyPatch) -> FakeAdc:
    fake = FakeAdc()

    def default(**kwargs: Any) -> tuple[Any, str]:
        fake.calls.append(kwargs)
        if isinstance(fake.credentials, Exception):
            raise fake.credentials
        return fake.credentials, "acme-broker"

    monkeypatch.setattr(google.auth, "default", default)
    return fake


def test_default_authorizer_uses_adc_scoped_to_cloud_platform_refreshed_off_the_loop(
    iam: IamCredentialsTestServer, fake_adc: FakeAdc
) -> None:
    from google.auth.transport.requests import Request

    credentials = fake_adc.credentials = FakeAdcCredentials(BROKER_TOKEN)

    async def go() -> int:
        loop_thread = threading.get_ident()
        async with IamCredentials(endpoint=iam.url) as client:  # no authorizer: ADC
            await client.generate_access_token(SA, [DRIVE_RO], 600)
            await client.generate_access_token(SA, [SHEETS_RO], 600)  # token still valid
            credentials.expired = True
            await client.generate_access_token(SA, [SHEETS_RO], 600)  # refreshed again
        return loop_thread

    loop_thread = asyncio.run(go())
    assert fake_adc.calls == [{"scopes": [CLOUD_PLATFORM_SCOPE]}]  # loaded once
    assert len(credentials.refresh_threads) == 2
    assert loop_thread not in credentials.refresh_threads  # blocking refresh in a worker thread
    assert all(isinstance(r, Request) for r in credentials.requests)
    assert [r.bearer for r in iam.requests] == [BROKER_TOKEN] * 3


def test_default_authorizer_refreshes_after_a_401(
    iam: IamCredentialsTestServer, fake_adc: FakeAdc
) -> None:
    credentials = fake_adc.credentials = FakeAdcCredentials(
        "adc-token-iam-no-longer-accepts-01", BROKER_TOKEN
    )
    mint(iam, authorizer=None)
    assert len(credentials.refresh_threads) == 2
    assert [r.status for r in iam.requests] == [401, 200]


def test_concurrent_first_calls_share_one_adc_refresh(
    iam: IamCredentialsTestServer, fake_adc: FakeAdc
) -> None:
    credentials = fake_adc.credentials = FakeAdcCredentials(BROKER_TOKEN)

    async def go() -> None:
        async with IamCredentials(endpoint=iam.url) as client:
            await asyncio.gather(
                *(client.generate_access_token(SA, [DRIVE_RO], 600) for _ in range(10))
            )

    asyncio.run(go())
    assert len(credentials.refresh_threads) == 1
    assert len(iam.issued) == 10


@pytest.mark.parametrize(
    ("adc", "expected", "retryable"),
    [
        (
            google.auth.exceptions.DefaultCredentialsError(
                "Your default credentials were not found"
            ),
            BrokerUnauthenticated,
            False,
        ),
        (
            FakeAdcCredentials(error=google.auth.exceptions.RefreshError("invalid_grant: revoked")),
            BrokerUnauthenticated,
            False,
        ),
        (
            FakeAdcCredentials(
                error=google.auth.exceptions.RefreshError("metadata 503", retryable=True)
            ),
            IamUnavailable,
            True,
        ),
        (
            FakeAdcCredentials(error=google.auth.exceptions.TransportError("connection reset")),
            IamUnavailable,
            True,
        ),
    ],
)
def test_default_authorizer_failures_are_classified(
    iam: IamCredentialsTestServer,
    fake_adc: FakeAdc,
    adc: Any,
    expected: type[TokenBrokerError],
    retryable: bool,
) -> None:
    fake_adc.credentials = adc
    error = mint_error(iam, authorizer=None)
    assert type(error) is expected
    assert error.retryable is retryable
    assert iam.request_count == 0  # nothing is sent without the broker's own token


def test_default_authorizer_can_be_given_credentials_and_scopes(
    iam: IamCredentialsTestServer, fake_adc: FakeAdc
) -> None:
    credentials = FakeAdcCredentials(BROKER_TOKEN)
    authorizer = ApplicationDefaultAuthorizer(["scope-a"], credentials=credentials)
    mint(iam, authorizer=authorizer)
    assert fake_adc.calls == []  # google.auth.default was never consulted
    assert authorizer.scopes == ("scope-a",)


# --- the local server's documented behaviour on the wire ---------------------------------------


def _post(
    server: IamCredentialsTestServer,
    body: Any,
    *,
    account: str = SA,
    project: str = "-",
    bearer: str | None = BROKER_TOKEN,
    method: str = "POST",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    url = f"{server.url}/v1/projects/{project}/serviceAccounts/{account}:generateAccessToken"
    return httpx.request(method, url, json=body, headers=headers, timeout=5)


@pytest.mark.parametrize(
    ("kwargs", "status", "rpc_status", "message"),
    [
        ({"body": {"scope": [DRIVE_RO]}, "project": "acme-prod"}, 400, "INVALID_ARGUMENT", "'-'"),
        ({"body": {}}, 400, "INVALID_ARGUMENT", "Scope required"),
        ({"body": {"scope": []}}, 400, "INVALID_ARGUMENT", "Scope required"),
        ({"body": {"scope": DRIVE_RO}}, 400, "INVALID_ARGUMENT", "scope"),
        ({"body": {"scope": [DRIVE_RO], "lifetime": "0s"}}, 400, "INVALID_ARGUMENT", "lifetime"),
        ({"body": {"scope": [DRIVE_RO], "lifetime": "3601s"}}, 400, "INVALID_ARGUMENT", "3600s"),
        ({"body": {"scope": [DRIVE_RO], "lifetime": "15m"}}, 400, "INVALID_ARGUMENT", "lifetime"),
        ({"body": {"scope": [DRIVE_RO], "lifetime": 900}}, 400, "INVALID_ARGUMENT", "lifetime"),
        (
            {"body": {"scope": [DRIVE_RO], "lifetimeSeconds": 900}},
            400,
            "INVALID_ARGUMENT",
            'Unknown name "lifetimeSeconds"',
        ),
        (
            {"body": {"scope": [DRIVE_RO], "delegates": [f"projects/acme/serviceAccounts/{SA}"]}},
            400,
            "INVALID_ARGUMENT",
            "projects/-/serviceAccounts/",
        ),
        ({"body": {"scope": [DRIVE_RO]}, "bearer": None}, 401, "UNAUTHENTICATED", "missing"),
        ({"body": {"scope": [DRIVE_RO]}, "bearer": "nobody"}, 401, "UNAUTHENTICATED", "invalid"),
        ({"body": {"scope": [DRIVE_RO]}, "account": OTHER_SA}, 403, "PERMISSION_DENIED", "denied"),
        (
            {"body": {"scope": [DRIVE_RO]}, "account": "gone@acme.iam.gserviceaccount.com"},
            404,
            "NOT_FOUND",
            "gone@",
        ),
        ({"body": {"scope": [DRIVE_RO]}, "method": "GET"}, 404, "NOT_FOUND", "Method not found"),
    ],
)
def test_server_errors_use_the_google_rpc_shape(
    iam: IamCredentialsTestServer,
    kwargs: dict[str, Any],
    status: int,
    rpc_status: str,
    message: str,
) -> None:
    response = _post(iam, **kwargs)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert (error["code"], error["status"]) == (status, rpc_status)
    assert message in error["message"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer ")
    assert iam.issued == []


def test_server_defaults_lifetime_to_one_hour_and_answers_rfc3339_z(
    iam: IamCredentialsTestServer, ledger_path: Path
) -> None:
    before = datetime.now(UTC)
    response = _post(iam, {"scope": [DRIVE_RO]}, account=SA.replace("@", "%40"))
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"accessToken", "expireTime"}
    assert body["accessToken"].startswith("ya29.")
    assert RFC3339_Z.fullmatch(body["expireTime"])
    expires = datetime.fromisoformat(body["expireTime"].replace("Z", "+00:00"))
    assert abs((expires - (before + timedelta(hours=1))).total_seconds()) <= 5
    assert iam.issued[0].lifetime_seconds == 3600
    assert body["accessToken"] in ledger_path.read_text().splitlines()

    fractional = _post(iam, {"scope": [DRIVE_RO], "lifetime": "1.5s"})
    assert fractional.status_code == 200
    assert iam.issued[1].lifetime_seconds == 1.5


# --- nothing leaks ----------------------------------------------------------------------------


def test_no_broker_or_minted_token_in_any_error_or_log_line(
    iam: IamCredentialsTestServer, ledger_path: Path, capture_dir: Path
) -> None:
    token = mint(iam)
    assert token.access_token.reveal() not in repr(token)
    assert token.access_token.reveal() not in f"{token}"

    errors: list[BaseException] = []
    iam.faults([Fault(503, retry_after="1"), Fault(200, body="html"), Fault(status=None, delay=1)])
    for kwargs in (
        {},  # 503
        {},  # malformed 200
        {"timeout": 0.2},  # timeout
        {"service_account": OTHER_SA},  # 403
        {"service_account": "gone@acme-prod.iam.gserviceaccount.com"},  # unknown: 404
        {"lifetime": 4000},  # refused client-side
    ):
        with pytest.raises(TokenBrokerError) as caught:
            mint(iam, **kwargs)
        errors.append(caught.value)

    async def refused() -> str:
        return BROKER_TOKEN + "-revoked"

    with pytest.raises(BrokerUnauthenticated) as caught:
        mint(iam, authorizer=refused)
    errors.append(caught.value)

    minted = {line for line in ledger_path.read_text().splitlines() if line}
    assert token.access_token.reveal() in minted
    texts = [f"{e} {e!r} {e.args} {vars(e)}" for e in errors]
    log = (capture_dir / "library-log.jsonl").read_text()
    assert "impersonated token minted" in log and "impersonation failed" in log
    assert token.access_token.fingerprint in log  # the fingerprint is logged, not the value
    for secret in minted:
        assert all(secret not in text for text in texts)
        assert secret not in log
    # The broker's own token (sent as Bearer on every request above) is in no error, no log line.
    assert all(r.bearer == BROKER_TOKEN for r in iam.requests if r.status != 401)
    assert all(BROKER_TOKEN not in text for text in texts)
    assert BROKER_TOKEN not in log


def test_without_the_client_library_impersonation_is_a_configuration_error(
    iam: IamCredentialsTestServer,
) -> None:
    code = f"""
import asyncio, sys
sys.modules["google.cloud.iam_credentials_v1"] = None  # as if google-cloud-iam were absent
from tokenbroker.adapters.gcp.iam_credentials import IamCredentials, ImpersonationMisconfigured

async def token() -> str:
    return {BROKER_TOKEN!r}

async def go() -> None:
    async with IamCredentials(endpoint={iam.url!r}, authorizer=token) as client:
        try:
            await client.generate_access_token({SA!r}, [{DRIVE_RO!r}], 300)
        except ImpersonationMisconfigured as error:
            print(error.code, error.retryable, error.message)

asyncio.run(go())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.startswith("invalid_config False ")
    assert "pip install 'tokenbroker[gcp]'" in out.stdout
    assert iam.request_count == 0


def test_google_sdk_debug_logging_never_shows_the_minted_token(
    iam: IamCredentialsTestServer,
) -> None:
    """``GOOGLE_SDK_PYTHON_LOGGING_SCOPE`` makes the client library log each response at DEBUG,
    with a ``payload`` that is meant to be the response message: for ``generateAccessToken``,
    the token. (google-cloud-iam 2.27 passes the HTTP response to ``to_json`` and logs ``null``;
    a fix there would log the token.) The adapter drops those records; the second mint, with
    its filter removed, shows the test sees them."""
    from tests.conftest import save_output

    code = f"""
import asyncio, logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
from tokenbroker.adapters.gcp import iam_credentials
from tokenbroker.kernel.log import configure_logging
configure_logging("debug")

async def token() -> str:
    return {BROKER_TOKEN!r}

async def go() -> None:
    async with iam_credentials.IamCredentials(endpoint={iam.url!r}, authorizer=token) as client:
        await client.generate_access_token({SA!r}, [{DRIVE_RO!r}], 300)
        sys.stdout.flush(); sys.stderr.flush()
        print("---control---", flush=True); print("---control---", file=sys.stderr, flush=True)
        from google.cloud.iam_credentials_v1.services.iam_credentials.transports import rest
        logger = logging.getLogger(rest.__name__)
        for f in list(logger.filters):
            logger.removeFilter(f)
        await client.generate_access_token({SA!r}, [{DRIVE_RO!r}], 300)

asyncio.run(go())
"""
    env = {**os.environ, "GOOGLE_SDK_PYTHON_LOGGING_SCOPE": "google.cloud.iam_credentials_v1"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    stdout, _, stdout_control = out.stdout.partition("---control---")
    stderr, _, stderr_control = out.stderr.partition("---control---")
    first, second = (t.access_token for t in iam.issued)
    save_output("iam-credentials-google-sdk-debug", stdout, stderr)
    assert "Sending request" in stdout + stderr  # the library's DEBUG logging is on
    assert first not in stdout + stderr
    assert BROKER_TOKEN not in stdout + stderr
    assert "Received response" not in stdout + stderr
    assert "Received response" in stdout_control + stderr_control
    assert second not in stdout_control + stderr_control  # not even today's library does
