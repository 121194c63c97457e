"""The benchmark scripts run and report what they promise (a small n; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.system.processes import REPO

pytestmark = pytest.mark.system


def test_refresh_throughput_reports_its_figures() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "refresh_throughput.py"),
            "--n",
            "300",
            "--json-only",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"n", "seconds", "per_second", "floor_per_second", "ratio"} <= set(figures)
    assert figures["n"] == 300
    assert figures["refreshed"] == 300
    assert figures["server_invalid_grants"] == 0
    assert figures["ratio"] > 0


def test_refresh_throughput_gcp_mode_reports_calls_per_refresh() -> None:
    from tests.support.emulators import emulator

    emulator("firestore")  # skips with the install hint when the emulators are missing
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "refresh_throughput.py"),
            "--backend",
            "gcp",
            "--n",
            "150",
            "--steady-state",
            "--rpc-latency-ms",
            "10",
            "--json-only",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["backend"] == "gcp"
    assert figures["refreshed"] == 150
    assert figures["server_invalid_grants"] == 0
    assert figures["ok"] is True
    assert (figures["steady_state"], figures["measured_versions"]) == (True, "4->5")
    assert figures["rpc_latency_ms"] == 10
    # Issue 13's floor, past retention: 0 reads, 1 access, 2 writes -> 300 a minute.
    quota = figures["secret_manager_quota"]
    assert quota["calls_per_refresh_by_quota"] == {"access": 1.0, "read": 0.0, "write": 2.0}
    assert quota["refreshes_per_minute_per_project"] == 300


def test_idtoken_verify_and_cold_start_report_their_figures() -> None:
    verify = subprocess.run(
        [sys.executable, str(REPO / "bench" / "idtoken_verify.py"), "--n", "200", "--rounds",
         "1", "--json-only"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr[-3000:]
    figures = json.loads(verify.stdout.strip().splitlines()[-1])
    assert figures["verifier_per_second"] > 0
    assert figures["floor_per_second"] > 0
    cold = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cold_start.py"), "--runs", "1", "--gcp", "off"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    # Exit 1 means the ratio target was missed: a figure, not a broken script.
    assert cold.returncode in (0, 1), cold.stderr[-3000:]
    assert {"issuer_ms", "trivial_ms", "ratio"} <= set(
        json.loads(cold.stdout.strip().splitlines()[-1])
    )


def test_cold_start_reports_the_first_token_on_the_gcp_backend() -> None:
    """The first ``/token`` on the gcp backend (Firestore emulator, Secret Manager test
    server): ~10 s at ``--runs 1``, on the emulator this process runs (the bench takes it
    from ``FIRESTORE_EMULATOR_HOST``)."""
    from tests.support.emulators import emulator

    emulator("firestore")  # skips with the install hint when the emulators are missing
    cold = subprocess.run(
        [sys.executable, str(REPO / "bench" / "cold_start.py"), "--runs", "1", "--gcp", "on"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cold.returncode in (0, 1), cold.stderr[-3000:]  # 1: a target missed, a figure
    figures = json.loads(cold.stdout.strip().splitlines()[-1])
    assert {"issuer_ms", "trivial_ms", "ratio", "issuer_first_token_ms", "first_token_ratio",
            "issuer_gcp_livez_ms", "started_instance_first_token_ms"} <= set(figures)  # fmt: skip
    assert figures["identity"] == "platform"
    assert 0 < figures["started_instance_first_token_ms"] < figures["issuer_first_token_ms"]


def test_issuer_throughput_reports_its_figures() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "issuer_throughput.py"), "--duration", "1",
         "--warmup", "0.5", "--pairs", "1", "--no-same-request-floor", "--json-only"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    # Exit 1 means a target was missed on this short run: a figure, not a broken script.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"issuer_rps", "bare_rps", "ratio", "issuer_p99_ms", "bare_p99_ms",
            "secret_reads_per_issue"} <= set(figures)  # fmt: skip
    assert figures["issuer_rps"] > 0
    assert figures["secret_reads_per_issue"] <= 0.01


def _quota_pacing(*args: str) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quota_pacing.py"), "--minutes", "15", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])


def test_quota_pacing_keeps_within_the_quota_and_shows_what_it_prevents() -> None:
    code, paced = _quota_pacing()
    assert code == 0, paced
    assert paced["resource_exhausted"] == 0 and paced["connections_lost"] == 0
    assert paced["refreshes"] == paced["capacity_floor"]  # the quota kept full
    assert paced["max_started_in_a_minute"] == paced["refreshes_per_minute_allowed"]
    # The same hour with the quota enforced but not declared: what the pacing prevents.
    code, unpaced = _quota_pacing("--no-pacing")
    assert code == 1
    assert unpaced["resource_exhausted"] > 0 and unpaced["ticks_halted"] > 0  # type: ignore[operator]


def test_fanout_refreshes_each_connection_once_with_1_and_2_workers() -> None:
    from tests.support.emulators import emulator

    emulator("firestore")  # skips with the install hint when the emulators are missing
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "fanout.py"), "--n", "200", "--workers", "1", "2",
         "--json-only"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["ok"] and figures["n"] == 200
    assert [run["workers"] for run in figures["runs"]] == [1, 2]
    for run in figures["runs"]:
        assert run["exactly_once"] and run["provider_refreshed"] == 200
        assert run["provider_invalid_grants"] == 0 and sum(run["claimed_per_worker"]) == 200
        assert run["per_worker_cpu_second"] > 0 and run["per_cpu_second"] > 0
