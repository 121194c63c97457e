"""After every other test: no token value issued during the run appears in any output.

Sources of token values: the ledger every oidc-provider test server writes (each access,
refresh and ID token its /token endpoint returned). Places searched: the library's log
capture (debug level, from this process and every child process), every saved CLI and
function-process output, and the raw bytes of every embedded database, WAL and outbox made
during the session (credentials there must be encrypted; events must carry no tokens).
"""

from __future__ import annotations

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
