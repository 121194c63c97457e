"""The real tools over ``terraform/``: ``terraform fmt`` and checkov, offline.

``terraform validate`` would need the google provider, which ``terraform init`` cannot download
here; ``test_terraform_schema.py`` checks against the provider's published schema instead, and
Cloud Build runs the real ``terraform validate``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.hcl import ROOT, TERRAFORM
from tests.deploy.provider_schema import CDKTF_GOOGLE_VERSION

pytestmark = pytest.mark.terraform

CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"


def _terraform() -> str:
    found = shutil.which("terraform")
    if not found:
        pytest.skip(
            "terraform is not installed (https://developer.hashicorp.com/terraform/install)"
        )
    return found


def _quiet_env() -> dict[str, str]:
    # No CLI config file exists here; pointing at an empty one keeps its warning off stderr.
    return {**os.environ, "TF_CLI_CONFIG_FILE": os.devnull, "CHECKPOINT_DISABLE": "1"}


def test_terraform_fmt_finds_nothing_to_change() -> None:
    result = subprocess.run(
        [_terraform(), "fmt", "-check", "-diff", "-recursive", str(TERRAFORM)],
        capture_output=True,
        text=True,
        env=_quiet_env(),
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _checkov(directory: Path) -> dict[str, object]:
    """The report of the documented command (README) in JSON, passed checks included (so
    without ``--quiet``)."""
    if not CHECKOV.exists():
        where = CHECKOV.relative_to(ROOT)
        pytest.skip(f"checkov is not installed at {where}: run tests/deploy/install-tools")
    result = subprocess.run(
        [
            str(CHECKOV),
            "-d",
            str(directory),
            "--framework",
            "terraform",
            "--compact",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        env={**_quiet_env(), "BC_SKIP_MAPPING": "TRUE"},
        check=False,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    (terraform,) = [r for r in reports if r.get("check_type") == "terraform"]
    return terraform


def test_checkov_finds_no_failed_check_and_every_skip_is_justified_inline() -> None:
    report = _checkov(TERRAFORM)
    results = report["results"]
    assert isinstance(results, dict)
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']})"
        for c in results["failed_checks"]
    ]
    assert failed == [], "\n".join(failed)
    assert results["passed_checks"], "checkov checked nothing: is terraform/ empty?"
    # Every skip is a comment next to its resource with a reason (checkov reads
    # "#checkov:skip=ID: reason"); a skip without a reason is not a decision.
    for check in results["skipped_checks"]:
        path = TERRAFORM / check["file_path"].lstrip("/")
        first, last = check["file_line_range"]
        lines = path.read_text().splitlines()[first - 1 : last]
        skips = [
            m
            for line in lines
            if (m := re.search(rf"#checkov:skip={check['check_id']}:\s*(\S.{{20,}})", line))
        ]
        assert skips, f"{check['check_id']} skipped without an inline reason in {path}"


def test_checkov_sees_every_resource_of_the_module() -> None:
    """checkov follows the example root into the module; scanned alone, the module's resources
    are all there too (a resource checkov could not parse would pass silently)."""
    report = _checkov(TERRAFORM / "modules" / "tokenbroker")
    results = report["results"]
    assert isinstance(results, dict)
    checked = {
        c["resource"].split("[")[0]
        for kind in ("passed_checks", "skipped_checks", "failed_checks")
        for c in results[kind]
    }
    for resource in (
        "google_cloudfunctions2_function.refresher",
        "google_cloudfunctions2_function.issuer",
        "google_storage_bucket.sources",
        "google_pubsub_topic.events",
        "google_project_iam_member.refresher_secrets",
        # checkov has IAM checks for the metric writers (CKV_GCP_41/42/46/49/117), none for
        # alert policies or dashboards.
        "google_project_iam_member.refresher_metric_writer",
        "google_project_iam_member.issuer_metric_writer",
    ):
        assert resource in checked, (resource, sorted(checked))


def test_the_installer_pins_what_the_tests_expect() -> None:
    """One version of each tool: the installer's pins, the lock file's and the loaders'."""
    script = (ROOT / "tests" / "deploy" / "install-tools").read_text()
    pins = dict(re.findall(r"^([A-Z_0-9]+)=(\S+)$", script, re.MULTILINE))
    assert pins["CDKTF_GOOGLE_VERSION"] == CDKTF_GOOGLE_VERSION
    assert re.fullmatch(r"[0-9a-f]{64}", pins["CDKTF_GOOGLE_WHEEL_SHA256"])
    lock = (ROOT / "tests" / "deploy" / "checkov-requirements.txt").read_text()
    assert f"checkov=={pins['CHECKOV_VERSION']} \\" in lock
    assert "--hash=sha256:" in lock
