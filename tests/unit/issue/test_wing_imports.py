"""The issue wing's imports point down only: kernel, ports, oauth and its own modules; never
the adapters, the entry points, a sibling wing, or an HTTP framework. The ports import only
the kernel. (The relay used to import the ASGI layer lazily: the one cycle in the tree.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tokenbroker

PACKAGE = Path(tokenbroker.__file__).parent
ISSUE_MAY_IMPORT = (
    "tokenbroker.kernel",
    "tokenbroker.ports",
    "tokenbroker.oauth",
    "tokenbroker.issue",
)
THIRD_PARTY_FORBIDDEN = ("starlette", "aiohttp", "httpx", "functions_framework", "flask")


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "issue").glob("*.py")), ids=lambda p: p.name)
def test_the_issue_wing_imports_only_downwards(path: Path) -> None:
    for name in imported(path):
        if name.startswith("tokenbroker"):
            assert name.startswith(ISSUE_MAY_IMPORT), f"{path.name} imports {name}"
        assert not name.startswith(THIRD_PARTY_FORBIDDEN), f"{path.name} imports {name}"


def test_the_ports_import_only_the_kernel() -> None:
    for name in imported(PACKAGE / "ports.py"):
        if name.startswith("tokenbroker"):
            assert name.startswith("tokenbroker.kernel"), name
