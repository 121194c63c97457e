"""What a worker gets from ``pip install 'tokenbroker[client]'``: the consumer, and nothing of the
broker -- no web server, no web framework, no cloud backend client.

Built as a user would get it: the wheel from this checkout, installed into a fresh virtual
environment with the versions ``uv.lock`` pins (``uv export`` as constraints), then the installed
set is listed and the package is imported in that environment.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.system.processes import REPO

pytestmark = pytest.mark.system

UV = REPO / ".tools" / "bin" / "uv"
#: Distributions a consumer must never pull in: web servers and frameworks, the broker's HTTP
#: stack and CLI, and every cloud backend client.
FORBIDDEN = {
    "aiohttp",
    "boto3",
    "botocore",
    "click",
    "flask",
    "functions-framework",
    "google-cloud-firestore",
    "google-cloud-pubsub",
    "google-cloud-secret-manager",
    "grpcio",
    "gunicorn",
    "joserfc",
    "starlette",
    "uvicorn",
    "werkzeug",
}


def _run(*args: str | Path, cwd: Path = REPO) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def client_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not UV.exists():
        pytest.skip("the pinned uv is not installed (scripts/bootstrap installs it)")
    work = tmp_path_factory.mktemp("packaging")
    _run(UV, "build", "--wheel", "--out-dir", work / "dist", "--quiet")
    (wheel,) = (work / "dist").glob("tokenbroker-*.whl")
    constraints = work / "constraints.txt"
    constraints.write_text(
        _run(UV, "export", "--frozen", "--no-hashes", "--no-emit-project", "--all-extras")
    )
    _run(UV, "venv", "--quiet", "--python", "3.11", work / "venv")
    python = work / "venv" / "bin" / "python"
    _run(UV, "pip", "install", "--quiet", "--python", python, "-c", constraints, f"{wheel}[client]")
    return python


def installed(python: Path) -> set[str]:
    listing = _run(UV, "pip", "list", "--python", python, "--format", "json")
    return {re.sub(r"[-_.]+", "-", entry["name"]).lower() for entry in json.loads(listing)}


def test_the_client_extra_installs_no_web_server_or_backend(client_env: Path) -> None:
    names = installed(client_env)
    assert {"tokenbroker", "httpx", "google-auth"} <= names
    assert names & FORBIDDEN == set()


def test_the_consumer_imports_and_the_broker_does_not(client_env: Path) -> None:
    probe = (
        "import sys, tokenbroker.consumer as c\n"
        "assert c.BrokerClient and c.AsyncBrokerClient\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aiohttp', 'starlette', 'flask', 'click', 'cryptography', 'google'} "
        "and not m.startswith('google.auth') and m != 'google')\n"
        "assert not heavy, heavy\n"
        "try:\n"
        "    import tokenbroker.entrypoints.cli\n"
        "except ModuleNotFoundError as e:\n"
        "    print('cli-missing', e.name)\n"
    )
    out = _run(client_env, "-c", probe)
    assert out.startswith("cli-missing click")
    typed = Path(_run(client_env, "-c", "import tokenbroker; print(tokenbroker.__file__)"))
    assert (typed.parent / "py.typed").exists()


def test_the_command_says_what_to_install_instead_of_a_traceback(client_env: Path) -> None:
    command = client_env.parent / "tokenbroker"
    done = subprocess.run(
        [str(command), "status"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert "pip install 'tokenbroker[broker]'" in done.stderr
    assert "Traceback" not in done.stderr
