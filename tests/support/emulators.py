"""The official Google Cloud emulators (Pub/Sub, Firestore), started on demand, once per test
process, on free ports of 127.0.0.1, and stopped at exit.

They come with the ``google-cloud-cli`` Debian package (or ``gcloud components install
pubsub-emulator cloud-firestore-emulator``); they cannot be installed from PyPI or npm. When
they are missing, the tests that need them skip with that reason.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = (
    "Google Cloud emulators not found: install the google-cloud-cli package (apt) or run "
    "`gcloud components install pubsub-emulator cloud-firestore-emulator`, and Java 17+"
)


def sdk_root() -> Path | None:
    override = os.environ.get("CLOUDSDK_ROOT_DIR")
    if override:
        return Path(override)
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    # /usr/bin/gcloud -> /usr/lib/google-cloud-sdk/bin/gcloud
    root = Path(os.path.realpath(gcloud)).parent.parent
    return root if (root / "platform").is_dir() else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Emulator:
    name: str
    env_var: str
    relative_command: list[str]
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    host: str = ""
    log_path: Path | None = None

    def command(self, root: Path, port: int) -> list[str]:
        return [str(root / self.relative_command[0]), *self.relative_command[1:], *self.args,
                "--host=127.0.0.1", f"--port={port}"]  # fmt: skip

    def skip_reason(self) -> str | None:
        root = sdk_root()
        if root is None or not (root / self.relative_command[0]).exists():
            return INSTALL_HINT
        if shutil.which("java") is None:
            return "Java is not installed; the Google Cloud emulators need Java 17+"
        return None

    def start(self, timeout: float = 60.0) -> str:
        root = sdk_root()
        assert root is not None
        port = _free_port()
        self.log_path = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")[1])
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(root, port), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.host = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name} did not listen within {timeout}s") from None
                time.sleep(0.1)
        return self.host

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


_lock = threading.Lock()
_running: dict[str, Emulator] = {}


def _factory(name: str) -> Emulator:
    if name == "pubsub":
        return Emulator(
            "pubsub-emulator",
            "PUBSUB_EMULATOR_HOST",
            ["platform/pubsub-emulator/bin/cloud-pubsub-emulator"],
        )
    if name == "firestore":
        return Emulator(
            "firestore-emulator",
            "FIRESTORE_EMULATOR_HOST",
            ["platform/cloud-firestore-emulator/cloud_firestore_emulator", "start"],
        )
    raise ValueError(name)


def emulator(name: str) -> Emulator:
    """The running emulator ``name`` ("pubsub" or "firestore"), started on first use.

    Calls ``pytest.skip`` when the emulator is not installed. Sets the matching
    ``*_EMULATOR_HOST`` variable so the official clients (and child processes) find it.
    """
    with _lock:
        if name in _running:
            return _running[name]
        candidate = _factory(name)
        reason = candidate.skip_reason()
        if reason is not None:
            import pytest

            pytest.skip(reason)
        candidate.start()
        atexit.register(candidate.stop)
        os.environ[candidate.env_var] = candidate.host
        _running[name] = candidate
        return candidate
