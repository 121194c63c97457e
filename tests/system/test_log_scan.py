"""After every other test: no token value issued during the run appears in any output.

Sources of token values: the ledger every oidc-provider test server writes (each access,
refresh and ID token its /token endpoint returned). Places searched: the library's log
capture (debug level, from this process and every child process), every saved CLI and
function-process output, and the raw bytes of every embedded database, WAL and outbox made
during the session (credentials there must be encrypted; events must carry no tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.system, pytest.mark.logscan]


def _issued_tokens(base: Path) -> set[str]:
    tokens: set[str] = set()
    for ledger in base.rglob("*token-ledger.txt"):
        tokens |= {line.strip() for line in ledger.read_text().splitlines() if line.strip()}
    return tokens


def _searched_files(base: Path, capture_dir: Path) -> list[Path]:
    files = [p for p in capture_dir.rglob("*") if p.is_file()]
    files += [p for p in base.rglob("tokenbroker.db*") if p.is_file()]
    return files


def test_no_issued_token_appears_in_any_log_output_or_event(
    tmp_path_factory: pytest.TempPathFactory, capture_dir: Path
) -> None:
    base = tmp_path_factory.getbasetemp()
    tokens = _issued_tokens(base)
    if not tokens:
        pytest.skip("no OAuth test server issued a token in this session; run with tests/system")
    files = _searched_files(base, capture_dir)
    log = capture_dir / "library-log.jsonl"
    assert log in files and log.stat().st_size > 0, "the library logged nothing: capture broken"
    assert any(p.name.startswith("tokenbroker.db") for p in files)

    leaks: list[str] = []
    for path in files:
        data = path.read_bytes()
        leaks.extend(
            f"{path.relative_to(base)} contains an issued token ({token[:6]}...)"
            for token in tokens
            if token.encode() in data
        )
    assert leaks == [], "\n".join(leaks)
    # The scan looked at real material: many tokens, and a log with rotations in it.
    assert len(tokens) >= 10
    assert b"credential rotated" in log.read_bytes()


#: Cloud Logging's LogSeverity names (https://cloud.google.com/logging/docs/reference/v2/rest/v2/LogEntry#logseverity).
SEVERITIES = {"DEFAULT", "DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL", "ALERT",
              "EMERGENCY"}  # fmt: skip
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
_TRACE = re.compile(r"projects/[a-z][-a-z0-9.:]{0,99}/traces/[0-9a-f]{32}")


def test_every_line_logged_in_the_session_is_cloud_logging_structured_json(
    capture_dir: Path,
) -> None:
    """Every line the library wrote during the session -- this process and every process the
    tests started -- is one JSON object Cloud Logging reads as a structured entry
    (https://cloud.google.com/logging/docs/structured-logging): ``severity`` one of LogSeverity,
    ``message`` a string, ``time`` RFC 3339 in UTC; a trace, when present, in the
    ``projects/PROJECT/traces/TRACE_ID`` form."""
    log = capture_dir / "library-log.jsonl"
    if not log.exists():
        pytest.skip("no library log captured in this session")
    problems: list[str] = []
    lines = log.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(f"line {number}: not JSON: {line[:120]!r}")
            continue
        if not isinstance(entry, dict):
            problems.append(f"line {number}: not an object")
            continue
        if entry.get("severity") not in SEVERITIES:
            problems.append(f"line {number}: severity {entry.get('severity')!r}")
        if not isinstance(entry.get("message"), str) or not entry["message"]:
            problems.append(f"line {number}: message {entry.get('message')!r}")
        if not isinstance(entry.get("time"), str) or not _TIME.fullmatch(entry["time"]):
            problems.append(f"line {number}: time {entry.get('time')!r}")
        trace = entry.get("logging.googleapis.com/trace")
        if trace is not None and not (isinstance(trace, str) and _TRACE.fullmatch(trace)):
            problems.append(f"line {number}: trace {trace!r}")
    assert problems == [], "\n".join(problems[:50])
    assert lines, "the library logged nothing: capture broken"
