"""Cold start: process start to first 200, the issuer function vs a trivial function.

Both run under the same server mode (``functions-framework --asgi``: gunicorn's arbiter imports
the function's module, then forks the uvicorn worker that serves). Each is started ``--runs``
times, alternating; the median of each is compared. By default the servers write and reuse
compiled bytecode, as a deployed function has it (``--bytecode``).

* ``issuer_ms``: the issuer's first 200 on ``GET /livez`` (the process answers: what its
  module-level imports cost; Cloud Run's default startup probe is a TCP one, so this is when
  the platform starts sending requests). Target: within 1.3x of the trivial function. The
  heavy cloud clients (Secret Manager, Firestore, IAM) are never imported on the path to the
  first answer; the worker builds them in the background once its own start is over.
* ``issuer_ready_ms`` (for information): its first 200 on ``GET /healthz`` (readiness: the
  instance built -- settings, policy, stores, verifier).
  These two run on the embedded backend with metrics on (``TOKENBROKER_METRICS=
  cloud-monitoring``: their client is imported at the first write, a minute after the start,
  never on this path).
* ``issuer_first_token_ms``: the first successful (200) ``POST /token`` on the **gcp backend**
  (``TOKENBROKER_BACKEND=gcp``: the Firestore emulator for state, the Secret Manager test
  server ``tests/support/secretmanager_server.py``; the issuer publishes nothing, so no Pub/Sub
  emulator), a connection with a current access token and a policy granting the caller, who
  sends what Cloud Run's IAM front end delivers (``--identity platform``, the deployed
  default: the ID token with ``SIGNATURE_REMOVED_BY_GOOGLE``) or a signed ID token the issuer
  verifies against a local JWK set (``--identity verify``), sent from the process start on.
  Target (issue 13): within 1.5x of the trivial function's first 200.
  ``issuer_gcp_livez_ms``: the same deployment's first 200 on ``/livez``, which the
  background build must not hold back. ``started_instance_first_token_ms``: how long the
  first ``/token`` itself takes on an instance started a second before it arrives (minimum
  instances, or an instance Cloud Run starts as traffic grows): what the warm-up buys.

Final line: {"issuer_ms", "trivial_ms", "ratio", "issuer_ready_ms", "ready_ratio",
"issuer_first_token_ms", "first_token_ratio", "issuer_gcp_livez_ms", "gcp_livez_ratio",
"started_instance_first_token_ms", "runs", ...}; exit 0 when both targets are met. ``--gcp
off`` (or the Firestore emulator missing, with ``--gcp auto``) leaves the gcp figures out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LIVEZ_TARGET = 1.3
FIRST_TOKEN_TARGET = 1.5

# The gcp deployment the first /token is measured on (tests/system/test_issuer_identity.py's
# names and claims).
FUNCTIONS_URL = "https://europe-west1-tb-bench.cloudfunctions.net/tokenbroker-issuer"
ID_ISSUER = "https://accounts.google.com"
KID = "google-key-1"
CALLER = "crm-sync@tb-bench.iam.gserviceaccount.com"
CONNECTION = "crm"
ACCESS_TOKEN = "AT-crm-cold-start-bench-current"  # noqa: S105 - a made-up test value
REMOVED = "SIGNATURE_REMOVED_BY_GOOGLE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Request:
    """What to send until the first 200: ``GET path``, or a ``POST`` with a JSON body."""

    def __init__(
        self, path: str, body: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        self.path = path
        self.body = body
        self.headers = dict(headers or {})

    def send(self, port: int) -> int:
        """The answer's status; an HTTP error status is returned, not raised."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{self.path}",
            data=self.body,
            headers=self.headers,
            method="POST" if self.body is not None else "GET",
        )
        # Once connected, wait for the answer (the first /token builds the instance): a
        # request timed out and sent again would be answered twice.
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - localhost
                return int(answer.status)
        except urllib.error.HTTPError as error:
            error.read()
            return int(error.code)


@contextlib.contextmanager
def served(target: str, source: Path, env: Mapping[str, str]) -> Iterator[tuple[int, float]]:
    """``functions-framework --asgi`` serving ``target``: yields its port and the
    ``perf_counter`` instant it was spawned at; its session is ended on the way out."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "functions-framework"), "--asgi", f"--target={target}", f"--source={source}",
         "--host=127.0.0.1", f"--port={port}"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield port, started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # a request still in flight (a store down)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def until_200(port: int, request: Request, deadline: float) -> None:
    """Send ``request`` until it is answered 200. A 503 (not ready) is asked again; any other
    status is a broken set-up and raises."""
    while time.perf_counter() < deadline:
        try:
            status = request.send(port)
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.002)
            continue
        if status == 200:
            return
        if status != 503:
            raise RuntimeError(f"{request.path} answered {status}, not 200")
        time.sleep(0.002)
    raise RuntimeError(f"no 200 on {request.path} in time")


def first_200(
    target: str, source: Path, request: Request, env: Mapping[str, str], timeout: float = 60
) -> float:
    """Milliseconds from spawning the process to the first 200 on ``request``."""
    with served(target, source, env) as (port, started):
        until_200(port, request, started + timeout)
        return (time.perf_counter() - started) * 1000


def started_instance(
    target: str, source: Path, request: Request, env: Mapping[str, str], settle: float = 1.0
) -> float:
    """Milliseconds the first ``request`` takes on an instance that answered ``/livez``
    ``settle`` seconds before it arrives: an instance started ahead of its first request
    (minimum instances; Cloud Run starting one as traffic grows)."""
    with served(target, source, env) as (port, started):
        until_200(port, Request("/livez"), started + 60)
        time.sleep(settle)
        sent = time.perf_counter()
        if request.send(port) != 200:
            raise RuntimeError(f"{request.path} did not answer 200 on a started instance")
        return (time.perf_counter() - sent) * 1000


# -- the gcp deployment -----------------------------------------------------------------------


def _tests_importable() -> None:
    for path in (REPO, REPO / "shared"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def firestore_emulator() -> str:
    """The Firestore emulator ``FIRESTORE_EMULATOR_HOST`` names (one already running: a
    test's), else the official one started through the tests' helper (stopped at exit).
    Raises ``LookupError`` with the install hint when it is missing."""
    running = os.environ.get("FIRESTORE_EMULATOR_HOST")
    if running:
        return running
    _tests_importable()
    import pytest
    from tests.support.emulators import emulator

    try:
        return emulator("firestore").host
    except pytest.skip.Exception as missing:
        raise LookupError(missing.msg) from None


@contextlib.contextmanager
def secret_manager_server() -> Iterator[str]:
    """``python -m tests.support.secretmanager_server`` in its own process (as
    ``tests/system/processes.standalone_server`` starts it); yields its address."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.secretmanager_server", "--port", "0"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None  # noqa: S101
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(timeout=30):
                raise RuntimeError("the Secret Manager test server did not start in 30 s")
        line = proc.stdout.readline().split()
        if len(line) < 2 or line[0] != "READY":
            raise RuntimeError(f"the Secret Manager test server failed to start: {line!r}")
        yield line[1]
    finally:
        proc.terminate()
        proc.wait(10)


def seed_gcp(project: str, firestore_host: str, secret_manager: str) -> None:
    """One connection with a current access token (two hours left), registered as the CLI
    does (tests/system/test_issuer_identity.py's ``_seed``, on the gcp backend)."""
    from tokenbroker.entrypoints.compose import build_runtime, start_logging
    from tokenbroker.entrypoints.settings import Settings
    from tokenbroker.kernel.model import Connection, Credential, GrantType
    from tokenbroker.kernel.secret import Secret

    start_logging(level="warning")
    runtime = build_runtime(
        Settings(
            backend="gcp", gcp_project=project, firestore_emulator_host=firestore_host,
            secret_manager_endpoint=secret_manager, metrics="off",
        )
    )  # fmt: skip
    try:
        now = datetime.now(UTC)
        runtime.registry().register(
            Connection(id=CONNECTION, profile="generic", grant=GrantType.REFRESH_TOKEN,
                       client_id="client", token_url="https://idp.invalid/token"),  # noqa: S106
            Credential(refresh_token=Secret("rt-crm"), client_secret=Secret("cs"),
                       access_token=Secret(ACCESS_TOKEN), obtained_at=now,
                       expires_at=now + timedelta(hours=2)),
        )  # fmt: skip
    finally:
        runtime.close()
        with contextlib.suppress(Exception):
            runtime.secrets.client.transport.close()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            runtime.state.close()  # type: ignore[attr-defined]


def caller_token(identity: str, key: object) -> str:
    """The caller's ID token as the container receives it: signed by ``key`` (``verify``), or
    with its signature replaced by Cloud Run's IAM front end (``platform``) --
    tests/system/test_issuer_identity.py's ``signed`` and ``delivered``."""
    from tests.support.oidc import sign_rs256

    now = int(time.time())
    claims = {
        "iss": ID_ISSUER, "aud": FUNCTIONS_URL, "azp": "1098", "sub": f"sub-{CALLER}",
        "email": CALLER, "email_verified": True, "iat": now, "exp": now + 7200,
    }  # fmt: skip
    token = sign_rs256(claims, key, kid=KID)  # type: ignore[arg-type]
    if identity == "verify":
        return token
    header, payload, _ = token.split(".")
    return f"{header}.{payload}.{REMOVED}"


@contextlib.contextmanager
def gcp_issuer(identity: str) -> Iterator[tuple[dict[str, str], Request]]:
    """The gcp deployment's environment for the issuer and its ``POST /token``."""
    _tests_importable()
    firestore_host = firestore_emulator()
    from cryptography.hazmat.primitives.asymmetric import rsa
    from tests.support.jwks_server import JwksServer
    from tests.support.oidc import rsa_public_jwk

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    project = f"tb-cold-{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="cold-start-gcp-"))
    policy = work / "policy.toml"
    policy.write_text(
        f'version = 1\n\n[[grants]]\ncallers = ["{CALLER}"]\nconnections = ["{CONNECTION}"]\n'
        'scopes = ["*"]\n'
    )
    with (
        secret_manager_server() as secret_manager,
        JwksServer({"keys": [rsa_public_jwk(key, KID)]}) as keys,
    ):
        seed_gcp(project, firestore_host, secret_manager)
        env = {
            "TOKENBROKER_BACKEND": "gcp",
            "TOKENBROKER_GCP_PROJECT": project,
            "FIRESTORE_EMULATOR_HOST": firestore_host,
            "TOKENBROKER_SECRET_MANAGER_ENDPOINT": secret_manager,
            "TOKENBROKER_POLICY_FILE": str(policy),
            "TOKENBROKER_ISSUER_AUDIENCE": FUNCTIONS_URL,
            "TOKENBROKER_ID_TOKEN_ISSUERS": ID_ISSUER,
            "TOKENBROKER_ID_TOKEN_KEYS_URL": keys.url,
            "TOKENBROKER_CALLER_IDENTITY": identity,
            "TOKENBROKER_LOG_LEVEL": "warning",
        }
        token = Request(
            "/token",
            json.dumps({"connection": CONNECTION}).encode(),
            {"Content-Type": "application/json",
             "Authorization": f"Bearer {caller_token(identity, key)}"},
        )  # fmt: skip
        yield env, token


# -- the run ----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--gcp", choices=("auto", "on", "off"), default="auto",
        help="the first /token on the gcp backend: auto (skipped, with a note, when the "
        "Firestore emulator is missing), on (required), off",
    )  # fmt: skip
    parser.add_argument(
        "--bytecode", choices=("cached", "none"), default="cached",
        help="cached (default): the servers write and reuse compiled bytecode, as a deployed "
        "function has it (the Python buildpack compiles every installed package); none: as "
        "this environment leaves it (PYTHONDONTWRITEBYTECODE, no .pyc: every start compiles "
        "every module it imports)",
    )  # fmt: skip
    parser.add_argument(
        "--identity", choices=("platform", "verify"), default="platform",
        help="the caller's ID token as Cloud Run's IAM front end delivers it (platform, the "
        "deployed default) or signed, verified by the issuer against a local JWK set",
    )  # fmt: skip
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="cold-start-"))
    policy = state / "policy.toml"
    policy.write_text("version = 1\n")
    env = {
        "TOKENBROKER_STATE_DIR": str(state),
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": "https://issuer.invalid",
        "TOKENBROKER_LOG_LEVEL": "warning",
        "TOKENBROKER_METRICS": "cloud-monitoring",
        "TOKENBROKER_GCP_PROJECT": "cold-start-bench",
    }
    if args.bytecode == "cached":  # written by the untimed first starts below
        env.update(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(state / "pycache"))
    issuer_source = REPO / "functions" / "issuer" / "main.py"
    trivial_source = REPO / "bench" / "trivial_function.py"
    trivial_request, livez, healthz = Request("/"), Request("/livez"), Request("/healthz")
    with contextlib.ExitStack() as stack:
        gcp: tuple[dict[str, str], Request] | None = None
        gcp_note = None
        if args.gcp != "off":
            try:
                gcp = stack.enter_context(gcp_issuer(args.identity))
            except LookupError as missing:
                if args.gcp == "on":
                    raise SystemExit(f"--gcp on: {missing}") from None
                gcp_note = f"gcp figures skipped: {missing}"
                print(gcp_note, file=sys.stderr)
        # Untimed: the OS file cache, the bytecode cache, the emulator's and servers' own
        # first calls.
        first_200("hello", trivial_source, trivial_request, env)
        first_200("issue", issuer_source, healthz, env)
        if gcp is not None:
            first_200("issue", issuer_source, gcp[1], {**env, **gcp[0]})
        issuer, trivial, ready, token, gcp_livez, started = [], [], [], [], [], []
        for _ in range(args.runs):
            trivial.append(first_200("hello", trivial_source, trivial_request, env))
            issuer.append(first_200("issue", issuer_source, livez, env))
            ready.append(first_200("issue", issuer_source, healthz, env))
            if gcp is not None:
                gcp_env = {**env, **gcp[0]}
                token.append(first_200("issue", issuer_source, gcp[1], gcp_env))
                gcp_livez.append(first_200("issue", issuer_source, livez, gcp_env))
                started.append(started_instance("issue", issuer_source, gcp[1], gcp_env))
    floor = statistics.median(trivial)
    result: dict[str, object] = {
        "issuer_ms": median(issuer),
        "trivial_ms": median(trivial),
        "ratio": round(statistics.median(issuer) / floor, 3),
        "issuer_ready_ms": median(ready),
        "ready_ratio": round(statistics.median(ready) / floor, 3),
    }
    ok = statistics.median(issuer) / floor <= LIVEZ_TARGET
    if token:
        first_token_ratio = statistics.median(token) / floor
        result.update(
            issuer_first_token_ms=median(token),
            first_token_ratio=round(first_token_ratio, 3),
            issuer_gcp_livez_ms=median(gcp_livez),
            gcp_livez_ratio=round(statistics.median(gcp_livez) / floor, 3),
            started_instance_first_token_ms=median(started),
            identity=args.identity,
        )
        ok = ok and first_token_ratio <= FIRST_TOKEN_TARGET
    elif gcp_note is not None:
        result["note"] = gcp_note
    result.update(
        runs=args.runs,
        bytecode=args.bytecode,
        server="functions-framework --asgi (uvicorn)",
        cpus=os.cpu_count(),
        python=platform.python_version(),
    )
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
