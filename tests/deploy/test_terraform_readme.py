"""terraform/README.md documents every input and output of the module, as the module declares
them (the tables are generated: ``python -m tests.deploy.readme_table``)."""

from __future__ import annotations

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
