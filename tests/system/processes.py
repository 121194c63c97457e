"""Starting real server processes for tests and waiting until they answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import save_output
from tests.support.oidc import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@contextmanager
def functions_framework(
    target: str,
    source: Path,
    env: Mapping[str, str],
    *,
    name: str,
    asgi: bool = False,
    port: int | None = None,
) -> Iterator[str]:
    """A real ``functions-framework`` (gunicorn) process serving ``target``; yields its URL.
    ``port``: one chosen beforehand (a function that must know its own URL), else a free one."""
    port = port or free_port()
    log_path = Path(env.get("TOKENBROKER_TEST_CAPTURE_DIR", "/tmp")) / f"{name}.process.out"
    command = [
        str(BIN / "functions-framework"),
        f"--target={target}",
        f"--source={source}",
        "--host=127.0.0.1",
        f"--port={port}",
        *(["--asgi"] if asgi else []),
    ]
    with functions_framework_process(
        command, port=port, env={**os.environ, **env}, cwd=REPO, log_path=log_path, name=name
    ) as url:
        yield url


@contextmanager
def functions_framework_process(
    command: Sequence[str],
    *,
    port: int,
    env: Mapping[str, str],
    cwd: Path,
    log_path: Path,
    name: str,
    start_timeout: float = 30,
) -> Iterator[str]:
    """``command``, a ``functions-framework`` that will answer on 127.0.0.1:``port``, started
    in its own session with exactly ``env`` in ``cwd``, its output appended to ``log_path``.
    Yields its URL once ``/healthz`` answers; on the way out the session gets SIGTERM (SIGKILL
    10 s later) and the output is kept for the log scan under ``name``."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(command),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"functions-framework exited: {log_path.read_text()[-3000:]}")
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"functions-framework did not start in {start_timeout:g} s"
                    ) from None
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


@contextmanager
def standalone_server(module: str) -> Iterator[str]:
    """``python -m <module> --port 0``: a test server of ``tests/support`` in its standalone
    mode, in its own process. Yields the address its ``READY host:port`` line names; on the
    way out it is sent SIGTERM and must exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("READY 127.0.0.1:"), line
        yield line.split(" ", 1)[1]
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
