"""Starting real server processes for tests and waiting until they answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import save_output
from tests.support.oidc import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextmanager
def functions_framework(
    target: str, source: Path, env: Mapping[str, str], *, name: str, asgi: bool = False
) -> Iterator[str]:
    """A real ``functions-framework`` (gunicorn) process serving ``target``; yields its URL."""
    port = free_port()
    log_path = Path(env.get("TOKENBROKER_TEST_CAPTURE_DIR", "/tmp")) / f"{name}.process.out"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "functions-framework"),
                f"--target={target}",
                f"--source={source}",
                "--host=127.0.0.1",
                f"--port={port}",
                *(["--asgi"] if asgi else []),
            ],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"functions-framework exited: {log_path.read_text()[-3000:]}")
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("functions-framework did not start in 30 s") from None
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        save_output(name, log_path.read_bytes())
