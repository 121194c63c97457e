"""Fan-out's wiring (fanout.tf; docs/gcp.md, "Fan-out"), read from the parsed module.

Off by default; when on, the refresher publishes the shards to a topic of the module's and the
worker -- the refresher's code and identity, entry point ``refresh`` -- is triggered by that
topic alone, scaled up to ``fanout_max_instances``, and never fans out itself.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.deploy import hcl
from tokenbroker.entrypoints import refresher

pytestmark = pytest.mark.terraform

FANOUT_RESOURCES = {
    "google_pubsub_topic.fanout",
    "google_cloudfunctions2_function.refresher_worker",
    "google_pubsub_topic_iam_member.refresher_fanout_publisher",
    "google_cloud_run_v2_service_iam_member.refresher_worker_invoker",
}
REFRESHER_ACCOUNT = "serviceAccount:${google_service_account.refresher.email}"


@pytest.fixture(scope="module")
def module() -> hcl.Configuration:
    return hcl.load(hcl.MODULE)


def _worker(module: hcl.Configuration) -> hcl.Resource:
    return module.resource("google_cloudfunctions2_function.refresher_worker")


def test_fan_out_is_off_by_default_and_all_of_it_switches_together(
    module: hcl.Configuration,
) -> None:
    assert module.variables["fanout_shards"]["default"] == 1
    assert hcl.reference(module.locals["fanout_enabled"]) == "var.fanout_shards > 1"
    switched = {
        r.address for r in module.resources.values() if r.body.get("count") is not None
        and hcl.reference(r.body["count"]) == "local.fanout_enabled ? 1 : 0"
    }  # fmt: skip
    assert switched == FANOUT_RESOURCES


def test_the_refresher_is_told_the_shards_and_the_topic_the_worker_listens_on(
    module: hcl.Configuration,
) -> None:
    env = module.locals["fanout_environment"]
    assert env == {
        refresher.ENV_FANOUT_SHARDS: "${tostring(var.fanout_shards)}",
        refresher.ENV_FANOUT_TOPIC: "${local.fanout_topic}",
    }
    assert "local.fanout_environment" in module.locals["refresher_environment"]
    topic = module.resource("google_pubsub_topic.fanout")
    assert topic.body["name"] == "${local.fanout_topic}"
    trigger = _worker(module).block("event_trigger")
    assert trigger["pubsub_topic"] == "${google_pubsub_topic.fanout[0].id}"
    assert trigger["event_type"] == "google.cloud.pubsub.topic.v1.messagePublished"
    # A retryable failure is redelivered; the function acknowledges what cannot succeed.
    assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"


def test_the_worker_never_fans_out_and_refuses_the_operators_fanout_variables(
    module: hcl.Configuration,
) -> None:
    service = _worker(module).block("service_config")
    assert service["environment_variables"] == "${local.refresher_worker_environment}"
    composed = module.locals["refresher_worker_environment"]
    assert "fanout" not in composed, composed
    rules = [v["condition"] for v in module.variables["refresher_environment"]["validation"]]
    assert any(refresher.ENV_FANOUT_SHARDS in r and refresher.ENV_FANOUT_TOPIC in r for r in rules)


def test_the_worker_is_the_refreshers_code_on_a_cloudevent_entry_point(
    module: hcl.Configuration,
) -> None:
    build = _worker(module).block("build_config")
    assert build["entry_point"] == "refresh"
    source = build["source"][0]["storage_source"][0]
    assert source["object"] == '${google_storage_bucket_object.source["refresher"].name}'
    tree = ast.parse((hcl.ROOT / "functions" / "refresher" / "main.py").read_text())
    decorators = {
        node.name: [ast.unparse(d) for d in node.decorator_list]
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
    }
    assert decorators["refresh"] == ["functions_framework.cloud_event"]


def test_the_worker_scales_to_the_variable_one_tick_per_instance(
    module: hcl.Configuration,
) -> None:
    service = _worker(module).block("service_config")
    assert service["max_instance_count"] == "${var.fanout_max_instances}"
    assert service["min_instance_count"] == 0
    assert service["max_instance_request_concurrency"] == 1
    assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    assert module.variables["fanout_max_instances"]["default"] >= 1


def test_only_the_refresher_publishes_shards_and_only_its_trigger_invokes_the_worker(
    module: hcl.Configuration,
) -> None:
    worker = _worker(module)
    account = "${google_service_account.refresher.email}"
    assert worker.block("service_config")["service_account_email"] == account
    assert worker.block("event_trigger")["service_account_email"] == account
    on_topic = [
        r for r in module.resources.values()
        if "google_pubsub_topic.fanout" in str(r.body.get("topic"))
    ]  # fmt: skip
    assert [(r.address, r.body["role"], r.body["member"]) for r in on_topic] == [
        (
            "google_pubsub_topic_iam_member.refresher_fanout_publisher",
            "roles/pubsub.publisher",
            REFRESHER_ACCOUNT,
        )
    ]
    invokers = [
        r for r in module.resources.values()
        if r.type.startswith("google_cloud_run")
        and "google_cloudfunctions2_function.refresher_worker" in str(r.body.get("name"))
    ]  # fmt: skip
    assert [(r.body["role"], r.body["member"]) for r in invokers] == [
        ("roles/run.invoker", REFRESHER_ACCOUNT)
    ]


def test_eventarc_is_enabled_for_the_workers_trigger(module: hcl.Configuration) -> None:
    apis = module.resource("google_project_service.apis").body["for_each"]
    assert "eventarc.googleapis.com" in set(re.findall(r'"([a-z]+\.googleapis\.com)"', apis))
