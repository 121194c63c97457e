"""``terraform validate``, offline, against the google provider's published schema.

``terraform init`` cannot download the provider here, so ``terraform validate`` cannot run (it
runs in Cloud Build). The provider's schema ships in the CDKTF bindings' jsii assembly
(``provider_schema``): every resource and data source type used must exist, every argument and
nested block must be one of its schema's, every required argument must be set, a block the
provider allows once appears once, and every reference to a resource attribute must name one
the provider exports. References to variables and locals must name declared ones.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy import hcl
from tests.deploy.provider_schema import ASSEMBLY, Argument, Schema, load_schema

pytestmark = pytest.mark.terraform

#: ``google_x.name.attr[0].sub`` or ``data.google_x.name.attr``: a reference into a resource.
REFERENCE = re.compile(
    r"(?<![\w.\"])(?P<data>data\.)?(?P<type>google_\w+)\.(?P<name>\w+)"
    r"(?P<path>(?:\[[^\]]*\]|\.\w+)*)"
)
SYMBOL = re.compile(r"(?<![\w.])(?P<kind>var|local)\.(?P<name>\w+)")


@pytest.fixture(scope="module")
def schema() -> Schema:
    if not ASSEMBLY.exists():
        pytest.skip(
            f"the google provider schema is not installed ({ASSEMBLY.relative_to(hcl.ROOT)}): "
            "run tests/deploy/install-tools"
        )
    return load_schema()


@pytest.fixture(scope="module")
def configurations() -> list[hcl.Configuration]:
    return [hcl.load(d) for d in hcl.module_directories()]


def _check_dynamic(
    where: str, dynamics: list[hcl.Block], arguments: dict[str, Argument], problems: list[str]
) -> None:
    """``dynamic "label" { content { ... } }``: checked as blocks named ``label``."""
    for dynamic in dynamics:
        for label, spec in dynamic.items():
            argument = arguments.get(label)
            if argument is None or argument.block is None:
                problems.append(f"{where}: no block {label!r}")
                continue
            for content in spec.get("content", []):
                _check_body(f"{where}.{label}", content, argument.block, problems)


def _check_body(
    where: str, body: hcl.Block, arguments: dict[str, Argument], problems: list[str]
) -> None:
    for name, value in body.items():
        if name in hcl.META_ARGUMENTS and where.count(".") <= 2:
            continue
        if name == "dynamic":
            _check_dynamic(where, value, arguments, problems)
            continue
        argument = arguments.get(name)
        if argument is None:
            problems.append(f"{where}: no argument or block {name!r} in the provider's schema")
            continue
        is_block = isinstance(value, list) and value and isinstance(value[0], hcl.Block)
        if is_block:
            if argument.block is None:
                problems.append(f"{where}: {name!r} is an argument, written as a block")
                continue
            if argument.single and len(value) > 1:
                problems.append(f"{where}: block {name!r} may appear once")
            for item in value:
                _check_body(f"{where}.{name}", item, argument.block, problems)
    for name, argument in arguments.items():
        if argument.required and name not in body:
            dynamic = any(name in d for d in body.get("dynamic", []))
            if not dynamic:
                problems.append(f"{where}: required {name!r} is not set")


def test_the_assembly_is_the_provider_major_the_module_requires(schema: Schema) -> None:
    assert schema.provider_version.split(".")[0] == "6"
    module = hcl.load(hcl.MODULE)
    (google,) = [b["required_providers"][0]["google"] for b in module.terraform]
    assert google["source"] == "hashicorp/google"
    assert google["version"] == ">= 6.10, < 7.0"


def test_every_resource_and_argument_exists_and_required_ones_are_set(
    schema: Schema, configurations: list[hcl.Configuration]
) -> None:
    problems: list[str] = []
    checked = 0
    for config in configurations:
        for resource in config.resources.values():
            types = schema.data if resource.kind == "data" else schema.resources
            if resource.type not in types:
                problems.append(f"{resource.address}: no such {resource.kind} type")
                continue
            where = f"{config.directory.relative_to(hcl.ROOT)}:{resource.address}"
            _check_body(where, resource.body, types[resource.type], problems)
            checked += 1
    assert problems == [], "\n".join(problems)
    assert checked >= 30


def _expressions(value: Any) -> list[str]:
    return [s for s in hcl.walk(value) if isinstance(s, str) and "${" in s]


def _attribute_path(path: str) -> list[str]:
    return list(re.findall(r"\.(\w+)", path))


def test_every_reference_names_a_declared_resource_and_an_exported_attribute(
    schema: Schema, configurations: list[hcl.Configuration]
) -> None:
    problems: list[str] = []
    references = 0
    for config in configurations:
        values: list[tuple[str, Any]] = [*config.everything()]
        values += [(f"var.{n}", v) for n, v in config.variables.items()]
        for where, value in values:
            for expression in _expressions(value):
                for match in REFERENCE.finditer(expression):
                    kind = "data" if match["data"] else "resource"
                    address = f"{'data.' if match['data'] else ''}{match['type']}.{match['name']}"
                    if address not in config.resources:
                        problems.append(f"{where}: {address} is not declared")
                        continue
                    attributes = (
                        schema.data_attributes if kind == "data" else schema.resource_attributes
                    )[match["type"]]
                    node: dict[str, Any] = attributes
                    for part in _attribute_path(match["path"]):
                        if part not in node:
                            problems.append(f"{where}: {address} exports no {part!r}")
                            break
                        node = node[part]
                    references += 1
                for match in SYMBOL.finditer(expression):
                    declared = config.variables if match["kind"] == "var" else config.locals
                    if match["name"] not in declared:
                        problems.append(f"{where}: {match[0]} is not declared")
    assert problems == [], "\n".join(problems)
    assert references >= 30


def test_the_checker_catches_what_validate_would(schema: Schema) -> None:
    """The checker itself: a misspelt argument, a block where an argument belongs, a missing
    required argument, and a repeated single block are each reported."""
    arguments = schema.resources["google_cloud_scheduler_job"]
    problems: list[str] = []
    body = hcl.Block(
        {
            "schedul": "* * * * *",
            "http_target": [
                hcl.Block({"http_method": "POST"}),
                hcl.Block({"uri": "https://x"}),
            ],
            "region": [hcl.Block({})],
        }
    )
    _check_body("job", body, arguments, problems)
    assert any("'schedul'" in p for p in problems), problems
    assert any("'region' is an argument" in p for p in problems), problems
    assert any("required 'name'" in p for p in problems), problems
    assert any("block 'http_target' may appear once" in p for p in problems), problems
    assert any("job.http_target: required 'uri'" in p for p in problems), problems


def test_the_monitoring_resources_are_checked_like_the_others(
    schema: Schema, configurations: list[hcl.Configuration]
) -> None:
    """The monitoring resources go through the checks above (every type of every module
    directory does); their JSON and filter strings are checked by test_terraform_monitoring.py,
    which the schema cannot see into."""
    used = {r.type for c in configurations for r in c.resources.values()}
    for resource_type in (
        "google_monitoring_alert_policy",
        "google_monitoring_dashboard",
        "google_monitoring_metric_descriptor",
        "google_monitoring_notification_channel",
    ):
        assert resource_type in used, resource_type
        assert resource_type in schema.resources, resource_type
    # The blocks the policies rely on exist where they are written, at most once where single.
    policy = schema.resources["google_monitoring_alert_policy"]
    conditions = policy["conditions"].block
    assert conditions is not None
    threshold = conditions["condition_threshold"]
    assert threshold.single and threshold.block is not None
    assert {"denominator_filter", "denominator_aggregations", "evaluation_missing_data"} <= set(
        threshold.block
    )
    assert policy["documentation"].single and policy["alert_strategy"].single
