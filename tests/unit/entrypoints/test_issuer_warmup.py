"""The issuer's warm-up (issue 13): the instance built in a background thread as a worker
starts, before any request, and taken by the first request instead of a second build.

In process, as ``tests/unit/entrypoints/test_issuer_app.py`` serves it: ``functions/issuer/
main.py`` through functions-framework's ASGI app and ``httpx.ASGITransport``, the embedded
backend, the policy file, callers' ID tokens checked against a JWK set on 127.0.0.1 (``verify``
mode: the warm-up fetches the keys). The build is held back where a test needs a request to
arrive during it; a build that fails must answer exactly as a failed build on the request
always has -- the answers of a deployment without a warm-up are the reference.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import functions_framework
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import restore_session_logging
from tests.support.jwks_server import JwksServer
from tests.support.oidc import rsa_public_jwk, sign_rs256
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.entrypoints import compose
from tokenbroker.entrypoints import issuer as issuer_entry
from tokenbroker.entrypoints.compose import build_runtime
from tokenbroker.entrypoints.settings import Settings
from tokenbroker.kernel.log import flush
from tokenbroker.kernel.model import Connection, Credential, GrantType
from tokenbroker.kernel.secret import Secret

SOURCE = Path(__file__).resolve().parents[3] / "functions" / "issuer" / "main.py"
AUDIENCE = "https://issuer.tokenbroker.test"
ID_ISSUER = "https://accounts.tokenbroker.test"
KID = "warmup-key-1"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
CRM_TOKEN = "AT-crm-warmup-5e1f"
POLICY = f"""
version = 1

[[grants]]
callers = ["{WORKER}"]
connections = ["crm"]
scopes = ["*"]
"""


def bearer() -> dict[str, str]:
    now = int(time.time())
    claims = {
        "iss": ID_ISSUER, "aud": AUDIENCE, "sub": f"sub-{WORKER}", "email": WORKER,
        "email_verified": True, "iat": now, "exp": now + 3600,
    }  # fmt: skip
    return {"Authorization": f"Bearer {sign_rs256(claims, KEY, kid=KID)}"}


@pytest.fixture(scope="module")
def keys() -> Iterator[JwksServer]:
    with JwksServer({"keys": [rsa_public_jwk(KEY, KID)]}) as server:
        yield server


@pytest.fixture(autouse=True)
def session_logging() -> Iterator[None]:
    """Each build configures the issuer's logging from the environment: the session's again
    after each test (the capture file the log scan reads)."""
    yield
    restore_session_logging()


@pytest.fixture
def environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: JwksServer
) -> dict[str, str]:
    """An embedded deployment with one connection holding a current token, in the process
    environment (the issuer reads its settings there, as deployed)."""
    key = new_key_text()
    state_dir = tmp_path / "state"
    runtime = build_runtime(
        Settings(backend="embedded", state_dir=state_dir, encryption_key=Secret(key))
    )
    try:
        now = datetime.now(UTC)
        runtime.registry().register(
            Connection(id="crm", profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.invalid/token"),
            Credential(refresh_token=Secret("rt-crm"), client_secret=Secret("cs"),
                       access_token=Secret(CRM_TOKEN), obtained_at=now,
                       expires_at=now + timedelta(hours=2)),
        )  # fmt: skip
    finally:
        runtime.close()
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    env = {
        "TOKENBROKER_BACKEND": "embedded",
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_ID_TOKEN_ISSUERS": ID_ISSUER,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": keys.url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


class HeldBuilds:
    """``compose.build_issuer`` counted, and held until :meth:`release` (or failing with
    ``error``): what a slow cold start looks like from the requests' side."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, held: bool = True) -> None:
        self.calls = 0
        self.threads: list[str] = []
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._go = threading.Event()
        if not held:
            self._go.set()
        real = compose.build_issuer

        def build_issuer(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            self.threads.append(threading.current_thread().name)
            self.started.set()
            assert self._go.wait(10), "the test never released the build"
            if self.error is not None:
                raise self.error
            return real(*args, **kwargs)

        monkeypatch.setattr(compose, "build_issuer", build_issuer)

    def release(self) -> None:
        self._go.set()


Scenario = Callable[[httpx.AsyncClient], Awaitable[None]]


@asynccontextmanager
async def issuer_app() -> AsyncIterator[httpx.AsyncClient]:
    """The function as functions-framework serves it, in this event loop; shut down after
    (an HTTP session belongs to the loop that opened it)."""
    app = functions_framework.create_app("issue", str(SOURCE))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://issuer.test"
        ) as client:
            yield client
    finally:
        await issuer_entry.shutdown()


def run(scenario: Scenario) -> None:
    async def main() -> None:
        async with issuer_app() as client:
            await scenario(client)

    asyncio.run(main())


async def token(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/token", json={"connection": "crm"}, headers=bearer())


def answer(response: httpx.Response) -> tuple[int, Any, str | None]:
    return response.status_code, response.json(), response.headers.get("retry-after")


def reasons(log: Path) -> list[dict[str, Any]]:
    flush()
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [line for line in lines if line["message"] == "issuer not ready: cannot start"]


# --- a request during the warm-up ----------------------------------------------------------


def test_requests_during_the_warm_up_wait_for_it_and_the_instance_is_built_once(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = HeldBuilds(monkeypatch)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert issuer_entry.start_warmup()
        assert not issuer_entry.start_warmup()  # one pending: no second
        assert await asyncio.to_thread(builds.started.wait, 10)  # the build is under way...
        first = asyncio.create_task(token(client))
        ready = asyncio.create_task(client.get("/healthz"))
        more = [asyncio.create_task(token(client)) for _ in range(5)]
        # ... and held: the process still answers, and the others wait for the build.
        live = await client.get("/livez")
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        await asyncio.sleep(0.05)
        assert not first.done() and not ready.done()
        builds.release()
        answered = await first
        assert answered.status_code == 200, answered.text
        assert answered.json()["access_token"] == CRM_TOKEN
        assert (await ready).json() == {"status": "ok"}
        for response in await asyncio.gather(*more):
            assert response.json()["access_token"] == CRM_TOKEN
        assert (await token(client)).status_code == 200
        assert not issuer_entry.start_warmup()  # built: nothing to warm up

    run(scenario)
    assert builds.calls == 1
    assert builds.threads == ["issuer-warmup"]  # the warm-up's build, not a request's


def test_a_request_that_gives_up_waiting_leaves_the_warm_up_to_the_next(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter cancelled (a client gone) does not cancel the build nor lose its result."""
    builds = HeldBuilds(monkeypatch)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert issuer_entry.start_warmup()
        waiter = asyncio.create_task(issuer_entry.build())
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        builds.release()
        assert (await token(client)).json()["access_token"] == CRM_TOKEN

    run(scenario)
    assert builds.calls == 1


def test_the_warm_up_waits_for_the_process_to_go_idle_unless_a_request_needs_it() -> None:
    """A worker's warm-up lets the worker's own start finish first (it would share the
    interpreter lock with it); a request that needs the instance cuts the wait short."""
    wanted = threading.Event()
    started = time.monotonic()
    issuer_entry._until_idle(3.0, wanted)  # nothing else runs here: idle at once
    assert time.monotonic() - started < 2.0

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():  # Python bytecode, holding the lock between switches
            sum(range(1000))

    stop = threading.Event()
    spinner = threading.Thread(target=busy, args=(stop,), daemon=True)
    spinner.start()
    try:
        started = time.monotonic()
        issuer_entry._until_idle(0.3, wanted)  # never idle: waits to its limit
        assert time.monotonic() - started >= 0.3
        threading.Timer(0.05, wanted.set).start()
        started = time.monotonic()
        issuer_entry._until_idle(5.0, wanted)  # never idle, but wanted after 50 ms
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        spinner.join()


# --- a warm-up that fails ------------------------------------------------------------------


def _broken_answers() -> list[tuple[int, Any, str | None]]:
    """/healthz, /token twice, /healthz of a deployment whose build fails."""
    answers: list[tuple[int, Any, str | None]] = []

    async def scenario(client: httpx.AsyncClient) -> None:
        answers.append(answer(await client.get("/healthz")))
        answers.append(answer(await token(client)))
        answers.append(answer(await token(client)))
        answers.append(answer(await client.get("/healthz")))

    run(scenario)
    return answers


def test_a_misconfigured_warm_up_answers_and_logs_as_a_start_on_the_request_did(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TOKENBROKER_POLICY_FILE")
    log = tmp_path / "issuer.log"
    monkeypatch.setenv("TOKENBROKER_LOG_FILE", str(log))
    without = _broken_answers()  # the reference: no warm-up, built on the request
    assert without[0] == (503, {"status": "unready", "error": "invalid_config"}, "5")
    assert without[1][:2] == (500, {"error": "server_error", "error_description": "internal error"})
    assert len(reasons(log)) == 1

    log = tmp_path / "warmed.log"
    monkeypatch.setenv("TOKENBROKER_LOG_FILE", str(log))
    builds = HeldBuilds(monkeypatch, held=False)

    async def warmed(client: httpx.AsyncClient) -> None:
        assert issuer_entry.start_warmup()
        await asyncio.to_thread(builds.started.wait, 10)
        answers = [answer(await client.get("/healthz"))]
        answers += [answer(await token(client)), answer(await token(client))]
        answers.append(answer(await client.get("/healthz")))
        assert answers == without  # the same answers, word for word
        (reason,) = reasons(log)  # logged once, when a request met it, as before
        assert "TOKENBROKER_POLICY_FILE" in reason["error"]
        assert reason["retryable"] is False
        # Fixed: the next request builds afresh (the failed warm-up is not kept).
        monkeypatch.setenv("TOKENBROKER_POLICY_FILE", environment["TOKENBROKER_POLICY_FILE"])
        fixed = await token(client)
        assert fixed.status_code == 200, fixed.text

    run(warmed)
    # The first request took the warm-up's failure (no build of its own); every later one
    # built on the request, as before; then the fixed one.
    assert builds.threads[0] == "issuer-warmup"
    assert "issuer-warmup" not in builds.threads[1:]
    assert builds.calls == 1 + (len(without) - 1) + 1


def test_a_warm_up_that_meets_a_passing_failure_answers_503_until_the_retry(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokenbroker.kernel.errors import StoreUnavailable

    builds = HeldBuilds(monkeypatch, held=False)
    builds.error = StoreUnavailable("state store unavailable")
    monkeypatch.setattr(issuer_entry, "RETRY_BUILD_SECONDS", 0.2)

    async def scenario(client: httpx.AsyncClient) -> None:
        assert issuer_entry.start_warmup()
        first = await client.get("/healthz")
        assert (first.status_code, first.json()["error"]) == (503, "store_unavailable")
        builds.error = None
        assert (await client.get("/healthz")).status_code == 503  # within the wait
        await asyncio.sleep(0.25)
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await token(client)).json()["access_token"] == CRM_TOKEN

    run(scenario)
    assert builds.calls == 2


def test_a_warm_up_that_crashes_is_the_same_bare_500_and_the_process_goes_on(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in the build (a bug): the warm-up thread does not die with an
    unhandled exception; the first request gets the bug answer (the traceback goes to the
    log, never to the caller), as a build on the request does, and the next one builds
    again."""
    builds = HeldBuilds(monkeypatch, held=False)
    builds.error = RuntimeError("a bug in the build")
    seen: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    answers: dict[str, tuple[int, Any, str | None]] = {}

    async def scenario(client: httpx.AsyncClient, warm: bool) -> None:
        builds.error = RuntimeError("a bug in the build")
        if warm:
            assert issuer_entry.start_warmup()
        crashed = await token(client)
        answers[str(warm)] = answer(crashed)
        assert "a bug in the build" not in crashed.text
        builds.error = None
        assert (await token(client)).json()["access_token"] == CRM_TOKEN

    run(lambda client: scenario(client, False))
    run(lambda client: scenario(client, True))
    assert answers["True"] == answers["False"]
    assert answers["True"][:2] == (
        500, {"error": "server_error", "error_description": "internal error"},
    )  # fmt: skip
    assert seen == []
    assert builds.calls == 4
    assert builds.threads[2] == "issuer-warmup"


# --- what the warm-up builds, and how ------------------------------------------------------


def test_shutdown_waits_for_a_pending_warm_up_and_closes_what_it_built(
    environment: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = HeldBuilds(monkeypatch, held=False)
    closed: list[object] = []
    real = compose.IssuerService.aclose

    async def aclose(self: compose.IssuerService) -> None:
        closed.append(self)
        await real(self)

    monkeypatch.setattr(compose.IssuerService, "aclose", aclose)

    async def scenario() -> None:
        assert issuer_entry.start_warmup()
        await issuer_entry.shutdown()  # before any request took the warm-up's instance

    asyncio.run(scenario())
    assert builds.calls == 1
    assert len(closed) == 1
    assert issuer_entry._warmup is None and issuer_entry._service is None


def test_store_clients_are_built_with_the_instance_and_a_failing_one_is_left_to_its_request() -> (
    None
):
    built: list[str] = []

    class Store:
        @property
        def client(self) -> object:
            built.append("store")
            return object()

    class Unreachable:
        @property
        def client(self) -> object:
            built.append("unreachable")
            raise OSError("no credentials")

    class Embedded:  # no client library at all
        pass

    service: Any = SimpleNamespace(runtime=SimpleNamespace(state=Unreachable(), secrets=Store()))
    issuer_entry._warm_clients(service)
    assert built == ["unreachable", "store"]
    service.runtime.secrets = Embedded()
    issuer_entry._warm_clients(service)  # nothing to build, nothing raised


def test_the_collector_is_paused_for_the_build_and_back_on_after_it() -> None:
    assert gc.isenabled()
    pause = issuer_entry._CollectorPause()
    with pause():
        assert not gc.isenabled()
        with pause():  # nested (or a concurrent build): the collector stays off
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with pause():
            pass
        assert not gc.isenabled()  # off before, off after
    finally:
        gc.enable()


# --- which processes warm up ---------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_only_a_worker_gunicorns_arbiter_forks_warms_up() -> None:
    """The hook runs in every forked child; it starts a warm-up only when the fork is the
    arbiter's ``spawn_worker`` (the frame that called ``os.fork``)."""
    issuer_entry.warm_up_in_workers()
    issuer_entry.warm_up_in_workers()  # idempotent: one hook

    def forked_child_warms_up(fork: Callable[[], int]) -> bool:
        pid = fork()
        if pid == 0:  # the child: did the hook start a warm-up? (never build: exit at once)
            os._exit(0 if issuer_entry._warmup is not None else 3)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status) == 0

    arbiter: dict[str, Any] = {"__name__": "gunicorn.arbiter", "os": os}
    exec("def spawn_worker():\n    return os.fork()\n", arbiter)  # noqa: S102 - the arbiter's frame
    assert not forked_child_warms_up(os.fork)  # any other fork: nothing
    assert forked_child_warms_up(arbiter["spawn_worker"])
    assert issuer_entry._warmup is None  # and never in the parent
