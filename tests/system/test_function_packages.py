"""The deployable packages, installed and run the way Cloud Functions does it.

``scripts/package`` builds ``refresher.zip`` and ``issuer.zip``. Each is unzipped alone into an
empty directory, given a fresh ``python3 -m venv``, installed with exactly the Python
buildpack's ``pip install --requirement requirements.txt ...`` (the flags of
GoogleCloudPlatform/buildpacks ``pkg/python/python.go``, less ``--user``: a venv stands for the
user site; a download cache shared within the run stands for ``--no-cache-dir``), checked with
``pip check`` (the buildpack runs it too), and started as the buildpack's web process starts
it: the bare ``functions-framework`` command with ``FUNCTION_TARGET`` and
``FUNCTION_SIGNATURE_TYPE`` in the environment and no ``--asgi`` -- nothing from this checkout
on any path. Then it is called: the refresher by a Cloud Scheduler-shaped HTTP request
(``application/octet-stream`` body, OIDC bearer) and by a Pub/Sub-shaped CloudEvent, each
running a tick over an embedded-backend state the test prepared; the issuer on ``/healthz``
and ``/token``.

One venv per function (~15 s each with a warm cache); the build itself takes about a second.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.oidc import (
    RT_BASIC_ID,
    RT_BASIC_SECRET,
    OidcServer,
    free_port,
    sign_rs256,
    signing_jwks,
)
from tests.system.helpers import add_refresh_connection, embedded_runtime, outbox, tick
from tests.system.processes import REPO, functions_framework_process
from tokenbroker.adapters.embedded import new_key_text
from tokenbroker.kernel.model import ClientAuthMethod, EventType
from tokenbroker.kernel.secret import Secret

pytestmark = pytest.mark.system

PACKAGE = REPO / "scripts" / "package"
#: The Python buildpack's install command (pkg/python/python.go), without ``--user`` and
#: ``--no-cache-dir`` (see the module docstring).
BUILDPACK_PIP = (
    "install", "--upgrade", "--upgrade-strategy", "only-if-needed", "--no-warn-script-location",
    "--no-warn-conflicts", "--force-reinstall", "--no-compile", "--disable-pip-version-check",
)  # fmt: skip
AUDIENCE = "https://tokenbroker-issuer-abc123-ew.a.run.app"
WORKER = "crm-sync@tb-test.iam.gserviceaccount.com"
PACKAGES_NAMES = ("refresher", "issuer", "connect")
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", re.MULTILINE)


def _run(*args: str | Path, cwd: Path = REPO, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _build(out: Path, *args: str) -> dict[str, Path]:
    _run(PACKAGE, "--out", out, *args)
    return {name: out / f"{name}.zip" for name in PACKAGES_NAMES}


def _names(requirements: str) -> set[str]:
    return {re.sub(r"[-_.]+", "-", name).lower() for name in REQUIREMENT.findall(requirements)}


def _requirements(package: Path) -> str:
    with zipfile.ZipFile(package) as archive:
        return archive.read("requirements.txt").decode()


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not (REPO / ".tools" / "bin" / "uv").exists():
        pytest.skip("the pinned uv is not installed (scripts/bootstrap installs it)")
    return _build(tmp_path_factory.mktemp("packages"))


# --- what is in the zips -------------------------------------------------------------------------


def test_each_zip_holds_main_requirements_and_the_library_wheel(packages: dict[str, Path]) -> None:
    for name, package in packages.items():
        with zipfile.ZipFile(package) as archive:
            entries = archive.namelist()
            (wheel,) = [e for e in entries if e.endswith(".whl")]
            assert entries == sorted(["main.py", "requirements.txt", wheel])
            assert archive.read("main.py") == (REPO / "functions" / name / "main.py").read_bytes()
            assert re.fullmatch(r"tokenbroker-[0-9.]+-py3-none-any\.whl", wheel)
            for info in archive.infolist():
                assert info.external_attr >> 16 == 0o100644, info.filename
        requirements = _requirements(package)
        # Hash-checking mode: every requirement, the vendored wheel included, carries a hash.
        blocks = [b for b in re.split(r"\n(?=\S)", requirements) if not b.startswith("#")]
        assert blocks and all("--hash=sha256:" in block for block in blocks), name
        assert blocks[0].startswith(f"./{wheel} ")


def test_each_function_gets_only_what_it_needs(packages: dict[str, Path]) -> None:
    refresher = _names(_requirements(packages["refresher"]))
    issuer = _names(_requirements(packages["issuer"]))
    both = {
        "functions-framework",
        "aiohttp",
        "google-cloud-secret-manager",
        "google-cloud-firestore",
    }
    assert both <= refresher and both <= issuer
    assert "google-cloud-pubsub" in refresher  # it announces rotations
    assert "google-cloud-pubsub" not in issuer  # it never publishes
    assert {"google-cloud-iam", "httptools", "uvloop"} & refresher == set()
    assert {"google-cloud-iam", "httptools", "uvloop"} <= issuer  # impersonation; uvicorn
    # The connect pages: what the refresher has (they store credentials and publish events).
    connect = _names(_requirements(packages["connect"]))
    assert both | {"google-cloud-pubsub", "joserfc"} <= connect
    assert {"google-cloud-iam", "httptools", "uvloop"} & connect == set()
    # The default (gcp) preset: no AWS client, and no test or development tool anywhere.
    for names in (refresher, issuer, connect):
        assert {"boto3", "botocore", "moto", "pytest", "mypy", "ruff"} & names == set()


def test_the_aws_preset_adds_boto3_to_both(tmp_path: Path) -> None:
    if not (REPO / ".tools" / "bin" / "uv").exists():
        pytest.skip("the pinned uv is not installed (scripts/bootstrap installs it)")
    built = _build(tmp_path, "--backend", "aws")
    for package in built.values():
        assert "boto3" in _names(_requirements(package))


def _clone(into: Path) -> Path:
    """A clone of this commit (sharing the pinned uv)."""
    commit = _run("git", "rev-parse", "HEAD").strip()
    _run("git", "clone", "--quiet", "--no-checkout", REPO, into)
    _run("git", "checkout", "--quiet", commit, cwd=into)
    (into / ".tools").symlink_to(REPO / ".tools")
    return into


def test_a_lock_that_does_not_match_pyproject_is_refused(tmp_path: Path) -> None:
    """``uv export --locked``: a dependency added without ``uv lock`` fails the build (and no
    zip is written) instead of packaging a lock that says something else."""
    clone = _clone(tmp_path / "clone")
    pyproject = clone / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text().replace('"httptools>=0.6",', '"httptools>=0.6", "six>=1.16",')
    )
    _run("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "x",
         cwd=clone)  # fmt: skip
    done = subprocess.run(
        [str(clone / "scripts" / "package"), "--out", str(tmp_path / "out")],
        cwd=clone, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "uv.lock" in done.stderr and "needs to be updated" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("*.zip"))


def test_two_builds_of_one_commit_are_byte_identical(
    packages: dict[str, Path], tmp_path: Path
) -> None:
    """The second build from another clone of the commit, at another path, under another
    umask, at another time: nothing of the machine or the moment may reach the zips."""
    clone = _clone(tmp_path / "clone")
    time.sleep(1.1)  # a later second: a timestamp taken from the clock would differ
    script = 'umask 077 && exec scripts/package --out "$1"'
    done = subprocess.run(
        ["bash", "-c", script, "-", str(tmp_path / "again")],
        cwd=clone, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name, package in packages.items():
        again = tmp_path / "again" / f"{name}.zip"
        assert again.read_bytes() == package.read_bytes(), name


def test_a_tree_without_git_history_is_packaged_as_it_is_and_reproducibly(tmp_path: Path) -> None:
    """``gcloud builds submit`` uploads the source without ``.git`` by default: the files are
    packaged as they are, dated by ``SOURCE_DATE_EPOCH`` and labelled with ``COMMIT_SHA``."""
    tree = _clone(tmp_path / "clone")
    shutil.rmtree(tree / ".git")
    (tree / "shared" / "tokenbroker" / "__pycache__").mkdir(exist_ok=True)
    (tree / "shared" / "tokenbroker" / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1767225600", "COMMIT_SHA": "abc123"}
    builds = []
    for run in ("one", "two"):
        done = subprocess.run(
            [str(tree / "scripts" / "package"), "--out", str(tmp_path / run)],
            cwd=tree, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "not a git checkout" in done.stderr
        builds.append({n: (tmp_path / run / f"{n}.zip").read_bytes() for n in PACKAGES_NAMES})
    assert builds[0] == builds[1]
    with zipfile.ZipFile(tmp_path / "one" / "refresher.zip") as archive:
        assert "commit abc123" in archive.read("requirements.txt").decode()
        assert archive.infolist()[0].date_time == (2026, 1, 1, 0, 0, 0)
        (wheel,) = [n for n in archive.namelist() if n.endswith(".whl")]
        with zipfile.ZipFile(io.BytesIO(archive.read(wheel))) as inner:
            assert not [n for n in inner.namelist() if "__pycache__" in n]


def test_an_unknown_function_is_refused_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(PACKAGE), "--out", str(tmp_path), "nope"], capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no such function: nope" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


# --- installed into a fresh venv and started as the runtime starts it ---------------------------


@dataclass
class Installed:
    """One package unzipped alone, installed into its own fresh venv."""

    source: Path
    venv: Path

    def python(self, code: str) -> str:
        return _run(self.venv / "bin" / "python", "-c", code, cwd=self.source, env=_bare_env())


def _bare_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Nothing of this checkout: no PYTHONPATH, no VIRTUAL_ENV, the venv first on PATH."""
    keep = ("HOME", "LANG", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "SSL_CERT_FILE", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    return {**env, **(extra or {})}


@pytest.fixture(scope="module")
def pip_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One download cache for the run: the two venvs share most distributions."""
    return tmp_path_factory.mktemp("pip-cache")


def _install(package: Path, work: Path, pip_cache: Path) -> Installed:
    source = work / "source"
    source.mkdir()
    with zipfile.ZipFile(package) as archive:
        archive.extractall(source)
    venv = work / "venv"
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert python3, "no python3 on the system PATH"
    _run(python3, "-m", "venv", venv)
    python = venv / "bin" / "python"
    _run(
        python, "-m", "pip", *BUILDPACK_PIP, "--cache-dir", pip_cache,
        "--requirement", "requirements.txt",
        cwd=source, env=_bare_env(),
    )  # fmt: skip
    _run(python, "-m", "pip", "check", cwd=source, env=_bare_env())
    return Installed(source, venv)


@pytest.fixture(scope="module")
def refresher_installed(
    packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, pip_cache: Path
) -> Installed:
    return _install(packages["refresher"], tmp_path_factory.mktemp("refresher"), pip_cache)


@pytest.fixture(scope="module")
def issuer_installed(
    packages: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, pip_cache: Path
) -> Installed:
    return _install(packages["issuer"], tmp_path_factory.mktemp("issuer"), pip_cache)


def deployed(
    installed: Installed, target: str, signature_type: str, env: Mapping[str, str], *, name: str
) -> contextlib.AbstractContextManager[str]:
    """The buildpack's web process: ``functions-framework``, configured by the environment the
    platform sets (``FUNCTION_TARGET``, ``FUNCTION_SIGNATURE_TYPE``, ``PORT``), in the source
    directory. Yields its URL."""
    port = free_port()
    runtime_env = _bare_env(
        {
            **env,
            "FUNCTION_TARGET": target,
            "FUNCTION_SIGNATURE_TYPE": signature_type,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "PATH": f"{installed.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        }
    )
    # The bare command, found on the runtime PATH: the venv's own functions-framework.
    return functions_framework_process(
        ["functions-framework"],
        port=port,
        env=runtime_env,
        cwd=installed.source,
        log_path=installed.source.parent / f"{name}.process.out",
        name=name,
        start_timeout=60,
    )


def test_each_venv_holds_the_clients_its_function_uses_and_not_the_others(
    refresher_installed: Installed, issuer_installed: Installed
) -> None:
    probe = (
        "import importlib.util as u\n"
        "names = ['google.cloud.secretmanager_v1', 'google.cloud.firestore', "
        "'google.cloud.pubsub_v1', 'google.cloud.iam_credentials_v1', 'boto3', 'uvloop', "
        "'httptools', 'tokenbroker.entrypoints.refresher', 'tokenbroker.entrypoints.issuer']\n"
        "print(' '.join(n for n in names if u.find_spec(n.split('.')[0]) and "
        "(n.count('.') == 0 or u.find_spec(n))))\n"
    )
    refresher = set(refresher_installed.python(probe).split())
    issuer = set(issuer_installed.python(probe).split())
    stores = {"google.cloud.secretmanager_v1", "google.cloud.firestore"}
    assert stores | {"google.cloud.pubsub_v1", "tokenbroker.entrypoints.refresher"} <= refresher
    assert {"google.cloud.iam_credentials_v1", "boto3", "uvloop", "httptools"} & refresher == set()
    assert stores | {"google.cloud.iam_credentials_v1", "uvloop", "httptools"} <= issuer
    assert {"google.cloud.pubsub_v1", "boto3"} & issuer == set()
    # The gcp adapters import their clients when first used: import them now, in the venv.
    refresher_installed.python(
        "from google.cloud import secretmanager_v1, firestore, pubsub_v1\n"
        "import tokenbroker.adapters.gcp.secret_manager, tokenbroker.adapters.gcp.firestore\n"
        "import tokenbroker.adapters.gcp.pubsub\n"
    )
    issuer_installed.python(
        "from google.cloud import secretmanager_v1, firestore, iam_credentials_v1\n"
        "import tokenbroker.adapters.gcp.iam_credentials\n"
    )


def _embedded(work: Path, oidc: OidcServer, cid: str) -> tuple[Any, dict[str, str], str]:
    key = new_key_text()
    state_dir = work / "state"
    runtime = embedded_runtime(state_dir, encryption_key=Secret(key))
    original = add_refresh_connection(
        runtime, oidc, cid, client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )  # fmt: skip
    env = {
        "TOKENBROKER_BACKEND": "embedded",
        "TOKENBROKER_STATE_DIR": str(state_dir),
        "TOKENBROKER_ENCRYPTION_KEY": key,
        "TOKENBROKER_TEST_CAPTURE_DIR": os.environ.get("TOKENBROKER_TEST_CAPTURE_DIR", "/tmp"),
    }
    return runtime, env, original


def _scheduler_id_token() -> str:
    """What Cloud Scheduler sends in ``Authorization`` (Cloud Run's front end checks it)."""
    now = int(time.time())
    claims = {"iss": "https://accounts.google.com", "aud": "https://refresher", "iat": now,
              "exp": now + 300, "email": "scheduler@tb-test.iam.gserviceaccount.com"}  # fmt: skip
    return sign_rs256(claims, _rsa(), kid="scheduler")


def _rsa() -> Any:
    from joserfc.jwk import RSAKey

    return RSAKey.import_key(signing_jwks()["keys"][0]).raw_value


def _pubsub_event(payload: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """A binary-mode CloudEvent as Eventarc delivers a Pub/Sub message from Cloud Scheduler."""
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    event = {
        "message": {"data": data, "messageId": "7", "publishTime": "2026-12-02T08:00:00Z"},
        "subscription": "projects/p/subscriptions/eventarc-europe-west1-refresher",
    }
    headers = {
        "ce-id": str(uuid.uuid4()),
        "ce-specversion": "1.0",
        "ce-source": "//pubsub.googleapis.com/projects/p/topics/refresh-tick",
        "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
        "Content-Type": "application/json",
    }
    return headers, json.dumps(event).encode()


def test_the_refresher_package_runs_a_tick_from_scheduler_http_and_from_pubsub(
    refresher_installed: Installed, oidc: OidcServer, tmp_path: Path
) -> None:
    runtime, env, original = _embedded(tmp_path, oidc, "crm")
    try:
        with (
            deployed(
                refresher_installed, "refresh_http", "http", env, name="pkg-refresh-http"
            ) as http_url,
            deployed(
                refresher_installed, "refresh", "cloudevent", env, name="pkg-refresh-ce"
            ) as event_url,
        ):
            # A Scheduler HTTP job with a body: application/octet-stream unless the job says.
            response = httpx.post(
                http_url,
                content=b'{"connections": ["crm"]}',
                headers={
                    "Content-Type": "application/octet-stream",
                    "Authorization": f"Bearer {_scheduler_id_token()}",
                    "User-Agent": "Google-Cloud-Scheduler",
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
            assert response.json()["refreshed"] == 1
            stored = runtime.secrets.get("crm")
            assert stored.version == 2
            assert stored.credential.refresh_token is not None
            assert stored.credential.refresh_token.reveal() != original

            # Scheduler -> Pub/Sub -> Eventarc: the named connection is refreshed, due or not.
            headers, body = _pubsub_event({"connections": ["crm"]})
            response = httpx.post(event_url, headers=headers, content=body, timeout=60)
            assert response.status_code == 200, response.text
            assert runtime.secrets.get("crm").version == 3

            # A job without a body runs a tick over what is due: nothing, now.
            empty = httpx.post(http_url, content=b"", timeout=60)
            assert empty.status_code == 200, empty.text
            assert (empty.json()["due"], empty.json()["refreshed"]) == (0, 0)
        assert [e.type for e in outbox(runtime)] == [EventType.ROTATED, EventType.ROTATED]
        assert oidc.stats()["invalid_grant"] == 0
    finally:
        runtime.close()


def test_the_issuer_package_serves_asgi_healthz_and_a_token(
    issuer_installed: Installed, oidc: OidcServer, tmp_path: Path
) -> None:
    _issuer_serves_a_token(issuer_installed, oidc, tmp_path)


def _lower_bound(name: str) -> str:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in extras["optional-dependencies"]["functions"]:
        requirement = Requirement(spec)
        if requirement.name == name:
            (floor,) = [s.version for s in requirement.specifier if s.operator == ">="]
            return floor
    raise AssertionError(f"{name} is not in the functions extra")


def test_the_lowest_pinned_functions_framework_serves_the_issuer_as_asgi(
    packages: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
    pip_cache: Path,
    oidc: OidcServer,
    tmp_path: Path,
) -> None:
    """The pin's floor, not just the locked version: the issuer's wheel with the lowest
    functions-framework the range admits (and what that release needs: starlette<1,
    cloudevents<=1.11), the other distributions as ``uv.lock`` pins them."""
    floor = _lower_bound("functions-framework")
    work = tmp_path_factory.mktemp("issuer-floor")
    source = work / "source"
    with zipfile.ZipFile(packages["issuer"]) as archive:
        archive.extractall(source)
    (wheel,) = source.glob("tokenbroker-*.whl")
    requirements = (source / "requirements.txt").read_text()
    locked = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", requirements, re.MULTILINE)
    loose = {"functions-framework", "starlette", "cloudevents"}
    (source / "constraints.txt").write_text(
        "".join(f"{name}=={version}\n" for name, version in locked if name not in loose)
    )
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    assert python3, "no python3 on the system PATH"
    venv = work / "venv"
    _run(python3, "-m", "venv", venv)
    _run(
        venv / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check",
        "--cache-dir", pip_cache, "--constraint", "constraints.txt",
        f"./{wheel.name}[functions]", f"functions-framework=={floor}",
        cwd=source, env=_bare_env(),
    )  # fmt: skip
    installed = Installed(source, venv)
    version = installed.python(
        "import importlib.metadata as m; print(m.version('functions-framework'))"
    )
    assert Version(version.strip()) == Version(floor)
    _issuer_serves_a_token(installed, oidc, tmp_path)


def _issuer_serves_a_token(installed: Installed, oidc: OidcServer, tmp_path: Path) -> None:
    runtime, env, _ = _embedded(tmp_path, oidc, "crm")
    try:
        assert tick(runtime).refreshed == 1  # an access token to hand out
    finally:
        runtime.close()
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'version = 1\n\n[[grants]]\ncallers = ["{WORKER}"]\nconnections = ["crm"]\n'
        'scopes = ["*"]\nmax_lifetime_seconds = 900\n'
    )
    env |= {
        "TOKENBROKER_POLICY_FILE": str(policy),
        "TOKENBROKER_ISSUER_AUDIENCE": AUDIENCE,
        "TOKENBROKER_CALLER_IDENTITY": "verify",
        "TOKENBROKER_ID_TOKEN_ISSUERS": oidc.issuer,
        "TOKENBROKER_ID_TOKEN_KEYS_URL": oidc.jwks_url,
    }
    now = int(time.time())
    id_token = sign_rs256(
        {"iss": oidc.issuer, "aud": AUDIENCE, "sub": "sub-worker", "email": WORKER,
         "email_verified": True, "iat": now, "exp": now + 600},
        _rsa(), kid=signing_jwks()["keys"][0]["kid"],
    )  # fmt: skip
    with deployed(installed, "issue", "http", env, name="pkg-issuer") as url:
        health = httpx.get(f"{url}/healthz", timeout=30)
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        # Served by uvicorn (the ASGI app), not gunicorn's gthread Flask worker.
        assert health.headers.get("server") == "uvicorn"
        response = httpx.post(
            f"{url}/token",
            json={"connection": "crm"},
            headers={"Authorization": f"Bearer {id_token}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["connection"] == "crm"
        assert body["token_type"] == "Bearer"
        assert 0 < body["expires_in"] <= 900
        assert response.headers["cache-control"] == "no-store"


@pytest.fixture
def gcp_cloud() -> Iterator[tuple[dict[str, str], Any, Any]]:
    """The gcp preset on the emulators (Firestore, Pub/Sub) and the Secret Manager test server:
    the function's environment, the test's runtime on the same project, and a subscription."""
    from tests.support.emulators import emulator
    from tests.support.secretmanager_server import SecretManagerTestServer

    firestore = emulator("firestore")
    pubsub = emulator("pubsub")
    from google.cloud import pubsub_v1

    from tokenbroker.entrypoints.compose import build_runtime
    from tokenbroker.entrypoints.settings import Settings

    secret_manager = SecretManagerTestServer().start()
    project = f"tb-pkg-{uuid.uuid4().hex[:10]}"
    env = {
        "TOKENBROKER_BACKEND": "gcp",
        "TOKENBROKER_GCP_PROJECT": project,
        "TOKENBROKER_PUBSUB_TOPIC": "tokenbroker-events",
        "TOKENBROKER_SECRET_MANAGER_ENDPOINT": secret_manager.address,
        "TOKENBROKER_METRICS": "off",
        "FIRESTORE_EMULATOR_HOST": firestore.host,
        "PUBSUB_EMULATOR_HOST": pubsub.host,
        "TOKENBROKER_TEST_CAPTURE_DIR": os.environ.get("TOKENBROKER_TEST_CAPTURE_DIR", "/tmp"),
    }
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(project, "tokenbroker-events")
    publisher.create_topic(name=topic)
    subscription = subscriber.subscription_path(project, "pkg-" + uuid.uuid4().hex[:8])
    subscriber.create_subscription(request={"name": subscription, "topic": topic})
    runtime = build_runtime(
        Settings(
            backend="gcp", gcp_project=project, pubsub_topic="tokenbroker-events",
            secret_manager_endpoint=secret_manager.address,
            firestore_emulator_host=firestore.host,
        )
    )  # fmt: skip
    try:
        yield env, runtime, (subscriber, subscription)
    finally:
        runtime.close()
        subscriber.close()
        secret_manager.stop()


def test_the_refresher_package_runs_on_the_gcp_backend_against_the_emulators(
    refresher_installed: Installed, gcp_cloud: tuple[dict[str, str], Any, Any], oidc: OidcServer
) -> None:
    """The package's own google-cloud clients, on Secret Manager, Firestore and Pub/Sub."""
    env, runtime, (subscriber, subscription) = gcp_cloud
    original = add_refresh_connection(
        runtime, oidc, "crm", client_id=RT_BASIC_ID, client_secret=RT_BASIC_SECRET,
        auth_method=ClientAuthMethod.BASIC,
    )  # fmt: skip
    with (
        deployed(refresher_installed, "refresh_http", "http", env, name="pkg-gcp-http") as http_url,
        deployed(refresher_installed, "refresh", "cloudevent", env, name="pkg-gcp-ce") as event_url,
    ):
        response = httpx.post(
            http_url,
            content=b"{}",
            headers={"Content-Type": "application/octet-stream"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        assert response.json()["refreshed"] == 1
        stored = runtime.secrets.get("crm")
        assert stored.version == 2
        assert stored.credential.refresh_token is not None
        assert stored.credential.refresh_token.reveal() != original

        headers, body = _pubsub_event({"connections": ["crm"]})
        response = httpx.post(event_url, headers=headers, content=body, timeout=120)
        assert response.status_code == 200, response.text
        assert runtime.secrets.get("crm").version == 3

    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(received) < 2 and time.monotonic() < deadline:
        pulled = subscriber.pull(request={"subscription": subscription, "max_messages": 10})
        received += [json.loads(m.message.data) for m in pulled.received_messages]
        if pulled.received_messages:
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [m.ack_id for m in pulled.received_messages],
                }
            )
    assert [e["type"] for e in received] == ["credential.rotated", "credential.rotated"]
    assert oidc.stats()["invalid_grant"] == 0
