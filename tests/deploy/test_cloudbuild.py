"""cloudbuild.yaml's shape (issue 10, item 4): the steps in order, builder images pinned,
the apply gated by a substitution, and every ``$`` reference one Cloud Build substitutes
(built-in or declared), so nothing is left for the shell to misread."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.terraform

CLOUDBUILD = Path(__file__).resolve().parents[2] / "cloudbuild.yaml"
#: Cloud Build's built-in substitutions
#: (https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values).
BUILT_IN = {
    "PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "COMMIT_SHA", "SHORT_SHA",
    "REVISION_ID", "BRANCH_NAME", "TAG_NAME", "REPO_NAME", "REPO_FULL_NAME", "TRIGGER_NAME",
    "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT",
}  # fmt: skip


@pytest.fixture(scope="module")
def build() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CLOUDBUILD.read_text())
    return loaded


def test_the_steps_run_test_package_plan_apply_in_order(build: dict[str, Any]) -> None:
    assert [step["id"] for step in build["steps"]] == ["test", "package", "plan", "apply"]
    test, package, plan, _ = build["steps"]
    assert ".ci/run" in " ".join(test["args"])
    assert "scripts/package" in " ".join(package["args"])
    script = " ".join(plan["args"])
    assert "terraform validate" in script and "terraform plan" in script
    assert "-out=tfplan" in script


def test_every_builder_image_is_pinned_to_a_version(build: dict[str, Any]) -> None:
    for step in build["steps"]:
        image = step["name"]
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
        assert re.search(r"\d", tag), image


def test_apply_runs_only_with_the_substitution_and_only_the_plan_shown(
    build: dict[str, Any],
) -> None:
    assert build["substitutions"]["_APPLY"] == "false"
    script = " ".join(build["steps"][-1]["args"])
    assert 'if [ "${_APPLY}" = "true" ]' in script
    assert "terraform apply -input=false tfplan" in script
    assert "-auto-approve" not in CLOUDBUILD.read_text()


def test_every_dollar_reference_is_a_substitution(build: dict[str, Any]) -> None:
    declared = set(build["substitutions"])
    text = CLOUDBUILD.read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for match in re.finditer(r"\$\$|\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", body):
        name = match.group(1)
        if name is None:  # "$$": a literal dollar for the shell
            continue
        assert name in declared or name in BUILT_IN, name
