"""Cold start: process start to first 200, the issuer function vs a trivial function.

Both run under the same server mode (``functions-framework --asgi``, uvicorn). Each is started
``--runs`` times, alternating; the median of each is compared. The issuer must stay within 1.3x
of the trivial function: heavy cloud clients (Secret Manager, Firestore, Pub/Sub, IAM) are
imported lazily, on the first request that needs them, never at module import.

The issuer is measured to its first 200 on ``GET /livez`` (the process answers: what its
module-level imports cost; Cloud Run's default startup probe is a TCP one, so this is when the
platform starts sending requests) and, for information, to its first 200 on ``GET /healthz``
(readiness: the instance built -- settings, policy, stores, verifier -- which the first request
pays in any case). Metrics are on (``TOKENBROKER_METRICS=cloud-monitoring``): their client is
imported at the first write, a minute after the start, never on this path.

Final line: {"issuer_ms", "trivial_ms", "ratio", "issuer_ready_ms", "ready_ratio", "runs"}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_200(
    target: str, source: Path, path: str, env: dict[str, str], timeout: float = 30
) -> float:
    """Milliseconds from spawning the process to the first 200 on ``path``."""
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(BIN / "functions-framework"), "--asgi", f"--target={target}", f"--source={source}",
         "--host=127.0.0.1", f"--port={port}"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = started + timeout
        while time.perf_counter() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                    if r.status == 200:
                        return (time.perf_counter() - started) * 1000
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.002)
        raise RuntimeError(f"{target} did not answer 200 on {path} within {timeout}s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
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
    issuer_source = REPO / "functions" / "issuer" / "main.py"
    trivial_source = REPO / "bench" / "trivial_function.py"
    first_200("hello", trivial_source, "/", env)  # warm the OS file cache once
    issuer, trivial, ready = [], [], []
    for _ in range(args.runs):
        trivial.append(first_200("hello", trivial_source, "/", env))
        issuer.append(first_200("issue", issuer_source, "/livez", env))
        ready.append(first_200("issue", issuer_source, "/healthz", env))
    result = {
        "issuer_ms": round(statistics.median(issuer), 1),
        "trivial_ms": round(statistics.median(trivial), 1),
        "ratio": round(statistics.median(issuer) / statistics.median(trivial), 3),
        "issuer_ready_ms": round(statistics.median(ready), 1),
        "ready_ratio": round(statistics.median(ready) / statistics.median(trivial), 3),
        "runs": args.runs,
        "server": "functions-framework --asgi (uvicorn)",
    }
    print(json.dumps(result))
    return 0 if result["ratio"] <= 1.3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
