"""The google provider's schema, offline, from the jsii assembly of its prebuilt CDKTF bindings.

``terraform validate`` needs the provider binary, which ``terraform init`` cannot download
here. The CDKTF bindings (``cdktf-cdktf-provider-google`` on PyPI, ``@cdktf/provider-google`` on
npm) are generated from the provider's own schema and ship it as a jsii assembly: one class per
resource and data source (its docs name the Terraform type), one ``...Config`` struct of its
arguments (``optional`` unless required), one struct per nested block, and getters for what can
be referenced (``...OutputReference`` classes for nested blocks). ``tests/deploy/install-tools``
puts the assembly under ``.tools/terraform-schema/``; this module reads it once and keeps a
compact copy beside it.

Names: CDKTF turns ``snake_case`` into ``camelCase``; the way back is unambiguous for the names
the provider uses (lower-case words and digits).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.deploy.hcl import ROOT

CDKTF_GOOGLE_VERSION = "16.12.1"
ASSEMBLY = ROOT / ".tools" / "terraform-schema" / f"provider-google@{CDKTF_GOOGLE_VERSION}.jsii"
#: Derived from the assembly on first use; the name changes with the derivation.
COMPACT = ASSEMBLY.with_suffix(".schema-v1.json")

_REPRESENTS = re.compile(
    r"Represents a \{@link https://registry\.terraform\.io/providers/hashicorp/google/"
    r"(?P<version>[0-9.]+)/docs/(?P<kind>resources|data-sources)/\S+ (?P<type>google_\w+)\}"
)


def snake(camel: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", camel).lower()


@dataclass(frozen=True)
class Argument:
    """An argument or nested block of a resource: ``block`` is the nested block's schema,
    ``single`` says it may appear at most once (CDKTF types it as one struct, not a list)."""

    required: bool
    block: dict[str, Argument] | None
    single: bool = False


@dataclass(frozen=True)
class Schema:
    provider_version: str
    #: ``resources["google_x"]`` / ``data["google_x"]``: argument name -> Argument.
    resources: dict[str, dict[str, Argument]]
    data: dict[str, dict[str, Argument]]
    #: What can be referenced: ``attributes["google_x"]`` is a tree of attribute names
    #: (``{"service_config": {"uri": {}}}``); a leaf is an empty dict.
    resource_attributes: dict[str, dict[str, Any]]
    data_attributes: dict[str, dict[str, Any]]


def _struct_fqn(type_ref: dict[str, Any], types: dict[str, Any]) -> str | None:
    """The struct a property's type names, directly, in a list, or in a union with
    ``IResolvable`` (how CDKTF types nested blocks)."""
    if "fqn" in type_ref:
        target = types.get(type_ref["fqn"])
        return type_ref["fqn"] if target and target.get("datatype") else None
    if "collection" in type_ref and type_ref["collection"]["kind"] == "array":
        return _struct_fqn(type_ref["collection"]["elementtype"], types)
    if "union" in type_ref:
        for option in type_ref["union"]["types"]:
            found = _struct_fqn(option, types)
            if found:
                return found
    return None


def _arguments(fqn: str, types: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    assert depth < 20, fqn
    out: dict[str, Any] = {}
    for prop in types[fqn].get("properties", []):
        nested = _struct_fqn(prop["type"], types)
        out[snake(prop["name"])] = {
            "required": not prop.get("optional", False),
            "block": _arguments(nested, types, depth + 1) if nested else None,
            "single": bool(nested) and "fqn" in prop["type"],
        }
    return out


def _reference_type(fqn: str, types: dict[str, Any]) -> str | None:
    """The class whose getters a reference into ``fqn`` continues on: an OutputReference
    itself, or what a list's ``get(index)`` returns."""
    target = types.get(fqn)
    if not target or target.get("kind") != "class":
        return None
    for method in target.get("methods", []):
        if method["name"] == "get" and "fqn" in method.get("returns", {}).get("type", {}):
            return str(method["returns"]["type"]["fqn"])
    return fqn


def _attributes(fqn: str, types: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if depth > 8:
        return out
    for prop in types[fqn].get("properties", []):
        if prop.get("static") or prop["name"].endswith("Input"):
            continue
        child: dict[str, Any] = {}
        ref = prop["type"].get("fqn")
        if ref and ref.startswith("@cdktf/provider-google."):
            inner = _reference_type(ref, types)
            if inner:
                child = _attributes(inner, types, depth + 1)
        out[snake(prop["name"])] = child
    return out


def _build(assembly: dict[str, Any]) -> dict[str, Any]:
    types: dict[str, Any] = assembly["types"]
    compact: dict[str, Any] = {
        "provider_version": None,
        "resources": {},
        "data": {},
        "resource_attributes": {},
        "data_attributes": {},
    }
    for fqn, spec in types.items():
        if spec.get("kind") != "class":
            continue
        match = _REPRESENTS.search(spec.get("docs", {}).get("summary", ""))
        if not match or "initializer" not in spec:
            continue
        compact["provider_version"] = match["version"]
        (config,) = [p for p in spec["initializer"]["parameters"] if p["name"] == "config"]
        key = "resources" if match["kind"] == "resources" else "data"
        compact[key][match["type"]] = _arguments(config["type"]["fqn"], types)
        attributes_key = "resource_attributes" if key == "resources" else "data_attributes"
        compact[attributes_key][match["type"]] = _attributes(fqn, types)
    return compact


def _arguments_of(raw: dict[str, Any]) -> dict[str, Argument]:
    return {
        name: Argument(
            spec["required"],
            _arguments_of(spec["block"]) if spec["block"] is not None else None,
            spec.get("single", False),
        )
        for name, spec in raw.items()
    }


def load_schema(assembly: Path = ASSEMBLY, compact: Path = COMPACT) -> Schema:
    """The schema, from the compact copy when it is newer than the assembly."""
    if not compact.exists() or compact.stat().st_mtime < assembly.stat().st_mtime:
        data = _build(json.loads(assembly.read_text()))
        tmp = compact.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(compact)
    else:
        data = json.loads(compact.read_text())
    return Schema(
        provider_version=data["provider_version"],
        resources={k: _arguments_of(v) for k, v in data["resources"].items()},
        data={k: _arguments_of(v) for k, v in data["data"].items()},
        resource_attributes=data["resource_attributes"],
        data_attributes=data["data_attributes"],
    )
