"""``terraform/`` as data: every ``.tf`` file parsed by python-hcl2, made easy to assert on.

python-hcl2 (8.x) keeps HCL's quoting in what it returns: a label is ``'"google_x"'``, a string
literal ``'"text"'`` (its inner quotes escaped), an expression ``'${var.x}'``, and a block is a
list of dicts marked ``__is_block__``. Here labels and literals lose their quotes, a literal's
escapes are undone, blocks become lists of :class:`Block` (a dict that remembers it was a block)
and comments are dropped. An expression stays as python-hcl2 wrote it, ``${...}``, and a
template keeps its interpolations: ``serviceAccount:${each.value}``.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM = ROOT / "terraform"
MODULE = TERRAFORM / "modules" / "tokenbroker"

#: Terraform's meta-arguments and blocks: not the provider's, present on any resource.
META_ARGUMENTS = frozenset({"count", "for_each", "depends_on", "provider", "lifecycle"})


class Block(dict[str, Any]):
    """The body of a block (``resource``, ``condition { ... }``): attributes and nested blocks."""


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), inner)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _unquote(value)
    if isinstance(value, list):
        if value and all(isinstance(v, dict) and v.get("__is_block__") for v in value):
            return [_block(v) for v in value]
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        if value.get("__is_block__"):
            return _block(value)
        return {_unquote(k): _clean(v) for k, v in value.items() if not k.startswith("__")}
    return value


def _block(raw: dict[str, Any]) -> Block:
    return Block({_unquote(k): _clean(v) for k, v in raw.items() if not k.startswith("__")})


@dataclass(frozen=True)
class Resource:
    """A ``resource`` or ``data`` block: ``kind`` is ``resource`` or ``data``."""

    kind: str
    type: str
    name: str
    body: Block
    path: Path

    @property
    def address(self) -> str:
        prefix = "data." if self.kind == "data" else ""
        return f"{prefix}{self.type}.{self.name}"

    def block(self, *names: str) -> Block:
        """The one nested block at ``names`` (``block("service_config")``)."""
        body: Block = self.body
        for name in names:
            blocks = body.get(name)
            assert isinstance(blocks, list) and len(blocks) == 1, (self.address, names)
            body = blocks[0]
        return body


@dataclass
class Configuration:
    """One Terraform module directory: its resources, data sources, variables, locals,
    outputs and module calls."""

    directory: Path
    resources: dict[str, Resource] = field(default_factory=dict)
    variables: dict[str, Block] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Block] = field(default_factory=dict)
    modules: dict[str, Block] = field(default_factory=dict)
    terraform: list[Block] = field(default_factory=list)

    def of_type(self, resource_type: str) -> list[Resource]:
        return [r for r in self.resources.values() if r.type == resource_type]

    def resource(self, address: str) -> Resource:
        return self.resources[address]

    def everything(self) -> Iterator[tuple[str, Any]]:
        """(where, value) for every value outside the variables (whose descriptions and error
        messages may name what the module refuses)."""
        for address, resource in self.resources.items():
            yield address, resource.body
        for name, value in self.locals.items():
            yield f"local.{name}", value
        for name, body in self.outputs.items():
            yield f"output.{name}", body
        for name, body in self.modules.items():
            yield f"module.{name}", body


def _named(parsed: dict[str, Any], kind: str) -> Iterator[tuple[str, Block]]:
    for entry in parsed.get(kind, []):
        for raw_name, body in entry.items():
            yield _unquote(raw_name), _block(body)


def _add_resources(config: Configuration, parsed: dict[str, Any], path: Path) -> None:
    for kind in ("resource", "data"):
        for entry in parsed.get(kind, []):
            for raw_type, named in entry.items():
                for raw_name, body in named.items():
                    resource = Resource(
                        kind, _unquote(raw_type), _unquote(raw_name), _block(body), path
                    )
                    assert resource.address not in config.resources, resource.address
                    config.resources[resource.address] = resource


def load(directory: Path) -> Configuration:
    """Every ``*.tf`` file of ``directory`` (not its subdirectories: each is its own module)."""
    config = Configuration(directory)
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            parsed = hcl2.load(handle)
        _add_resources(config, parsed, path)
        config.variables.update(_named(parsed, "variable"))
        config.outputs.update(_named(parsed, "output"))
        config.modules.update(_named(parsed, "module"))
        for entry in parsed.get("locals", []):
            for name, value in entry.items():
                if not name.startswith("__"):
                    assert name not in config.locals, name
                    config.locals[name] = _clean(value)
        config.terraform.extend(_block(b) for b in parsed.get("terraform", []))
    return config


def module_directories() -> list[Path]:
    """Every directory under ``terraform/`` that holds ``.tf`` files."""
    return sorted({p.parent for p in TERRAFORM.rglob("*.tf")})


def walk(value: Any) -> Iterator[Any]:
    """Every scalar inside ``value``, dict keys included."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)
    else:
        yield value


def reference(expression: str) -> str:
    """The reference inside a bare ``${...}`` expression (``${var.x}`` -> ``var.x``)."""
    match = re.fullmatch(r"\$\{(.*)\}", expression, re.DOTALL)
    assert match, f"not a single expression: {expression!r}"
    return match[1].strip()


def expand_locals(text: str, config: Configuration, depth: int = 0) -> str:
    """``text`` with every ``${local.NAME}`` interpolation replaced by that local's (string)
    value, recursively: what a template says once the module's own names are resolved."""
    assert depth < 10, text

    def replace(match: re.Match[str]) -> str:
        value = config.locals[match[1]]
        assert isinstance(value, str), (match[1], value)
        return expand_locals(value, config, depth + 1)

    return re.sub(r"\$\{local\.([a-z_0-9]+)\}", replace, text)


def heredoc(text: str) -> str:
    """The text of a ``<<EOT`` / ``<<-EOT`` heredoc as python-hcl2 returns it (markers kept);
    the indented form loses the least indentation of its lines, as Terraform does."""
    match = re.fullmatch(r"<<(-?)([A-Za-z_]\w*)\n(.*?)\n?[ \t]*\2", text, re.DOTALL)
    assert match, f"not a heredoc: {text[:40]!r}"
    body = match[3] + "\n"
    return textwrap.dedent(body) if match[1] else body


def render_template(text: str, variables: dict[str, Any]) -> str:
    """``templatefile`` for templates of plain ``${name}`` interpolations: ``$${`` stands for a
    literal ``${``, and any other ``${...}`` (an expression, a directive) is refused, so what is
    rendered here is what Terraform renders (the evaluation test compares the two)."""
    escaped = "\x00"
    assert escaped not in text
    text = text.replace("$${", escaped)

    def value(match: re.Match[str]) -> str:
        assert match[1] in variables, f"template variable {match[1]!r} is not passed"
        item = variables[match[1]]
        return json.dumps(item) if isinstance(item, bool) else str(item)

    rendered = re.sub(r"\$\{([A-Za-z_]\w*)\}", value, text)
    assert "${" not in rendered and "%{" not in rendered, "a template expression not supported here"
    return rendered.replace(escaped, "${")
