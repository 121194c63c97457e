"""Session-wide test plumbing.

Every log line the library writes during the session (in this process and in every process a
test starts, which inherit the environment) is also appended to one capture file, at debug
level. The ``logscan`` test runs last and searches that file, every captured CLI/function
output and every embedded database for each token value the OAuth test servers issued.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from tokenbroker.kernel.log import configure_logging

CAPTURE_ENV = "TOKENBROKER_TEST_CAPTURE_DIR"

# Property tests explore new examples on every local run; in CI the same examples every run,
# so a landing is decided by the change and not by the draw (a failure found locally becomes a
# fixed case). Hypothesis's own database of failures is kept out of the repository.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the log scan after everything else, whatever the file order."""
    items.sort(key=lambda item: item.get_closest_marker("logscan") is not None)


@pytest.fixture(scope="session", autouse=True)
def capture_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("captured-output")
    saved = {
        k: os.environ.get(k) for k in ("TOKENBROKER_LOG_FILE", "TOKENBROKER_LOG_LEVEL", CAPTURE_ENV)
    }
    os.environ["TOKENBROKER_LOG_FILE"] = str(directory / "library-log.jsonl")
    os.environ["TOKENBROKER_LOG_LEVEL"] = "debug"
    os.environ[CAPTURE_ENV] = str(directory)
    restore_session_logging()
    yield directory
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def restore_session_logging() -> None:
    """The session's logging: debug, to stderr and to the capture file the log scan reads."""
    configure_logging("debug", log_file=os.environ["TOKENBROKER_LOG_FILE"])


def save_output(name: str, *texts: str | bytes) -> None:
    """Keep a subprocess's output for the end-of-session leak scan."""
    directory = Path(os.environ[CAPTURE_ENV])
    with (directory / f"{name}.out").open("ab") as handle:
        for text in texts:
            handle.write(text.encode() if isinstance(text, str) else text)
            handle.write(b"\n")
