"""terraform/README.md documents every input and output of the module, as the module declares
them (the tables are generated: ``python -m tests.deploy.readme_table``)."""

from __future__ import annotations

import re

import pytest

from tests.deploy import hcl, readme_table
from tokenbroker.issue.policy_file import load_policy

pytestmark = pytest.mark.terraform


def test_the_readme_tables_match_the_module() -> None:
    assert readme_table.current() == readme_table.render(), (
        "terraform/README.md is stale: run .venv/bin/python -m tests.deploy.readme_table"
    )


def test_every_variable_and_output_is_typed_and_described() -> None:
    module = hcl.load(hcl.MODULE)
    for name, body in module.variables.items():
        assert body.get("type"), name
        assert len(body.get("description", "")) > 10, name
    for name, body in module.outputs.items():
        assert len(body.get("description", "")) > 10, name


def test_the_example_policy_is_a_valid_policy_file() -> None:
    load_policy(hcl.TERRAFORM / "examples" / "basic" / "policy.toml")


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_the_readme_and_docs_list_every_alert_policy_with_its_severity() -> None:
    """The alerts tables (terraform/README.md, Monitoring; docs/operations.md, Alerts) name
    each alert policy of the module, with the severity it has."""
    policies = {
        r.name: r.body["severity"]
        for r in hcl.load(hcl.MODULE).of_type("google_monitoring_alert_policy")
    }
    readme = _section(readme_table.README.read_text(), "## Monitoring")
    rows = dict(re.findall(r"^\| `(\w+)` \((\w+)\) \|", readme, re.MULTILINE))
    assert rows == policies
    operations = _section((hcl.ROOT / "docs" / "operations.md").read_text(), "## Alerts")
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| (\w+) \|$", operations, re.MULTILINE))
    assert rows == policies
    for name in policies:
        match = re.search(rf"^### {name}: .+?(?=^### |\Z)", operations, re.MULTILINE | re.DOTALL)
        assert match, f"docs/operations.md has no section for {name}"
        assert "**What it means.**" in match[0] and "**What to do.**" in match[0], name
