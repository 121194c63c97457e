"""The library's shape, checked from its source: wings by role, imports pointing only down.

Every ``import`` in ``shared/tokenbroker`` counts -- at module level, inside functions (lazy
imports of heavy clients) and under ``TYPE_CHECKING`` -- because each is a dependency a reader
must follow. The order is docs/architecture.md's:

    kernel <- ports <- oauth <- refresh | issue | consumer <- adapters <- entrypoints

Wings of one rank (refresh, issue, consumer) do not import each other, and the consumer (what
integration workers install) depends on the kernel alone.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[2] / "shared" / "tokenbroker"

#: Wing -> rank. A module may import its own wing and any wing of a lower rank.
RANKS = {
    "kernel": 0,
    "ports": 1,
    "oauth": 2,
    "refresh": 3,
    "issue": 3,
    "consumer": 3,
    "adapters": 4,
    "entrypoints": 5,
}
#: Stricter than rank: what a wing may import besides itself.
ONLY = {"consumer": {"kernel"}}
#: The only modules that read the process environment.
ENVIRONMENT_NAMES = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}
ENVIRONMENT_READERS = {"tokenbroker.entrypoints.settings", "tokenbroker.consumer.settings"}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(LIBRARY.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The library modules ``name`` imports (``from a import b`` counts ``a.b`` when ``b`` is a
    module, else ``a``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {module for module in found if module in known and module != name}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = library_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_every_module_belongs_to_a_wing(graph: dict[str, set[str]]) -> None:
    strays = sorted(m for m in graph if m != "tokenbroker" and wing(m) not in RANKS)
    assert strays == [], f"modules outside the wings {sorted(RANKS)}: {strays}"


def test_imports_point_only_down(graph: dict[str, set[str]]) -> None:
    upward = []
    for module, imports in graph.items():
        if module == "tokenbroker":
            continue
        source = wing(module)
        for target in imports:
            destination = wing(target)
            if destination == source:
                continue
            allowed = (
                destination in ONLY[source]
                if source in ONLY
                else RANKS[destination] < RANKS[source]
            )
            if not allowed:
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == [], "imports that point up or across a layer"


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    """Tarjan's strongly connected components over every import, lazy ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_only_settings_read_the_environment() -> None:
    readers = defaultdict(list)
    for name, path in library_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            attribute = isinstance(node, ast.Attribute) and node.attr in ENVIRONMENT_NAMES
            imported = isinstance(node, ast.ImportFrom) and any(
                node.module == "os" and alias.name in ENVIRONMENT_NAMES for alias in node.names
            )
            if attribute or imported:
                readers[name].append(node.lineno)
    assert sorted(set(readers) - ENVIRONMENT_READERS) == []


# The checks above must be able to fail: each is tried on a small tree made to break it.


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for relative, text in files.items():
        target = tmp_path / "tokenbroker" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    root = tmp_path / "tokenbroker"
    modules = {
        ".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path: Path) -> None:
    graph = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "kernel/__init__.py": "",
            "kernel/a.py": "def f():\n    from tokenbroker.entrypoints import b\n",
            "entrypoints/__init__.py": "",
            "entrypoints/b.py": "from ..kernel import a\n",
            "consumer/__init__.py": "",
            "consumer/c.py": "from tokenbroker.ports import X\n",
            "ports.py": "",
        },
    )
    assert graph["tokenbroker.kernel.a"] == {"tokenbroker.entrypoints.b"}
    assert graph["tokenbroker.entrypoints.b"] == {"tokenbroker.kernel.a"}
    with pytest.raises(AssertionError):
        test_imports_point_only_down(graph)
    with pytest.raises(AssertionError):
        test_no_import_cycle(graph)
    consumer_only = {k: v for k, v in graph.items() if k.startswith("tokenbroker.consumer")}
    with pytest.raises(AssertionError):
        test_imports_point_only_down(consumer_only)
