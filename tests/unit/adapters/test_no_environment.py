"""Adapters read no environment: configuration reaches them as constructor arguments, from
``entrypoints/settings.py`` through the composition root (STYLE.md: one way to resolve
configuration; the entry points read the environment, nothing else does)."""

from __future__ import annotations

import ast
from pathlib import Path

import tokenbroker.adapters

ADAPTERS = Path(tokenbroker.adapters.__file__).parent
READERS = {"environ", "getenv", "environb", "getenvb"}


def environment_reads(source: str) -> list[tuple[int, str]]:
    """(line, name) of every mention of ``os.environ``/``os.getenv`` and their relatives."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names if alias.name in READERS]
            found += [(node.lineno, n) for n in names]
        if name in READERS:
            found.append((getattr(node, "lineno", 0), name))
    return sorted(found)


def test_no_adapter_module_reads_the_environment() -> None:
    modules = sorted(ADAPTERS.rglob("*.py"))
    assert len(modules) > 5  # the scan found the package
    reads = {
        str(path.relative_to(ADAPTERS)): environment_reads(path.read_text()) for path in modules
    }
    assert {module: found for module, found in reads.items() if found} == {}


def test_the_scan_sees_each_way_of_reading() -> None:
    source = "import os\nfrom os import getenv\na = os.environ.get('X')\nb = getenv('Y')\n"
    assert environment_reads(source) == [(2, "getenv"), (3, "environ"), (4, "getenv")]
