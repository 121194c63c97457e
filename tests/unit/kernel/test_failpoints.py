"""Failpoints kill the process exactly at the named pass, and only when armed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tokenbroker.kernel import failpoints

PROGRAM = """
import sys
from tokenbroker.kernel import failpoints
failpoints.arm(sys.argv[1])
for i in range(1, 6):
    print(i, flush=True)
    failpoints.failpoint("answer.received")
    failpoints.failpoint("other")
print("survived", flush=True)
"""


def _run(spec: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROGRAM, spec],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_an_armed_failpoint_kills_at_its_nth_pass() -> None:
    done = _run("answer.received:3")
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]


def test_disarmed_or_other_names_do_nothing() -> None:
    done = _run("")
    assert done.returncode == 0
    assert done.stdout.split()[-1] == "survived"
    assert _run("intent.durable").returncode == 0


@pytest.mark.parametrize("spec", ["x:0", "x:-1", ":3", "x:y"])
def test_a_malformed_spec_is_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="failpoint"):
        failpoints.arm(spec)


def test_settings_name_the_variable_for_a_bad_spec() -> None:
    from tokenbroker.entrypoints.settings import LogSettings
    from tokenbroker.kernel.errors import ConfigError

    with pytest.raises(ConfigError, match="TOKENBROKER_FAILPOINTS"):
        LogSettings.from_env({"TOKENBROKER_FAILPOINTS": "x:0"})
