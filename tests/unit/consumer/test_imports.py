"""The consumer is what integration workers install (``tokenbroker[client]``): it imports only
the kernel, the standard library, and -- when first needed -- httpx and google-auth."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tokenbroker.consumer

WING = Path(tokenbroker.consumer.__file__).parent
MODULES = sorted(WING.glob("*.py"))
LAZY = {"httpx", "google"}  # imported inside functions (or for type checking) only


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno))
    return found


def _eager(tree: ast.Module) -> ast.Module:
    """The module-level statements that run at import (not ``if TYPE_CHECKING:`` blocks)."""
    body = [
        node
        for node in tree.body
        if not (isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"))
    ]
    return ast.Module(body=[n for n in body if not isinstance(n, ast.FunctionDef | ast.ClassDef)])


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_the_consumer_imports_only_the_kernel_and_itself(path: Path) -> None:
    tree = ast.parse(path.read_text())
    wrong = []
    for name, line in _imports(tree):
        root = name.split(".")[0]
        if root == "tokenbroker":
            if not name.startswith(("tokenbroker.kernel.", "tokenbroker.consumer.")):
                wrong.append(f"{path.name}:{line} {name}")
        elif root not in sys.stdlib_module_names and root not in LAZY:
            wrong.append(f"{path.name}:{line} {name}")
    assert wrong == []


@pytest.mark.parametrize("path", MODULES, ids=lambda path: path.name)
def test_httpx_and_google_auth_are_never_imported_at_module_level(path: Path) -> None:
    eager = [name for name, _ in _imports(_eager(ast.parse(path.read_text())))]
    assert [name for name in eager if name.split(".")[0] in LAZY] == []


def test_importing_the_consumer_loads_nothing_heavy() -> None:
    probe = (
        "import json, sys; import tokenbroker.consumer; from tokenbroker.consumer import "
        "subscriber; print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    ours = [m for m in loaded if m.startswith("tokenbroker.")]
    assert all(m.startswith(("tokenbroker.kernel", "tokenbroker.consumer")) for m in ours), ours
    heavy = ("httpx", "google.auth", "google.oauth2", "requests", "aiohttp", "cryptography")
    assert [m for m in loaded if m.startswith(heavy)] == []


ENV_READERS = {"environ", "environb", "getenv"}


def _reads_environment(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        match node:
            case ast.Attribute(value=ast.Name(id="os"), attr=attr) if attr in ENV_READERS:
                return True
            case ast.ImportFrom(module="os", names=names) if {a.name for a in names} & ENV_READERS:
                return True
    return False


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = [p.name for p in MODULES if _reads_environment(ast.parse(p.read_text()))]
    assert readers == ["settings.py"]
