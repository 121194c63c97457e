"""What the Terraform wires together, read from the parsed files (python-hcl2).

Each test states one deployment rule from docs/issuer.md, docs/gcp.md and issue 10 and checks
it on the module's resources as written, so that an edit which breaks the rule fails here, not
at ``terraform apply`` or, worse, in production.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import pytest

from tests.deploy import hcl
from tokenbroker.adapters.gcp.firestore import BUDGETS_SUFFIX
from tokenbroker.adapters.gcp.firestore_sessions import SESSIONS_SUFFIX
from tokenbroker.entrypoints import refresher, settings

pytestmark = pytest.mark.terraform

IAM_MEMBER_TYPES_WITH_MEMBER = re.compile(r"^google_.*_iam_(member|binding)$")
SECRET_ROLE = re.compile(r"secretmanager")


@pytest.fixture(scope="module")
def module() -> hcl.Configuration:
    return hcl.load(hcl.MODULE)


@pytest.fixture(scope="module")
def configurations() -> list[hcl.Configuration]:
    return [hcl.load(d) for d in hcl.module_directories()]


def _functions(module: hcl.Configuration) -> dict[str, hcl.Resource]:
    return {r.name: r for r in module.of_type("google_cloudfunctions2_function")}


def module_of_root() -> hcl.Configuration:
    return hcl.load(hcl.MODULE)


def _default(module: hcl.Configuration, variable: str) -> Any:
    return module.variables[variable].get("default")


def _environment(module: hcl.Configuration, function: str) -> dict[str, str]:
    """A function's environment as the module composes it: ``merge(a, b, ...)`` of maps, the
    later winning, each a ``var.*`` (the operator's extras, unknown here: left out) or a
    ``local.*`` map literal."""
    expression = _functions(module)[function].block("service_config")["environment_variables"]
    composed = hcl.reference(expression)
    local = re.fullmatch(r"local\.(\w+)", composed)
    assert local, composed
    merged = hcl.reference(module.locals[local[1]])
    call = re.fullmatch(r"merge\((.*)\)", merged)
    assert call, merged
    env: dict[str, str] = {}
    for part in (p.strip() for p in call[1].split(",")):
        if part.startswith("var."):
            assert not env, f"{part} comes after the module's own settings and could override them"
            continue
        name = re.fullmatch(r"local\.(\w+)", part)
        assert name, part
        value = module.locals[name[1]]
        assert isinstance(value, dict), (part, value)
        env.update(value)
    return env


# --- each function its own identity ---------------------------------------------------------


def test_each_function_runs_as_a_service_account_of_its_own(module: hcl.Configuration) -> None:
    accounts = {
        name: hcl.reference(f.block("service_config")["service_account_email"])
        for name, f in _functions(module).items()
    }
    assert set(accounts) == {"refresher", "refresher_worker", "issuer", "connect"}
    # The fan-out worker is the refresher on a share of the due set: the refresher's account.
    assert accounts.pop("refresher_worker") == accounts["refresher"]
    for name, account in accounts.items():
        match = re.fullmatch(r"google_service_account\.(\w+)(\[0\])?\.email", account)
        assert match, (name, account)
        assert f"google_service_account.{match[1]}" in module.resources
    assert len(set(accounts.values())) == len(accounts), accounts
    # The scheduler's identity is a fourth account, not one of the functions'.
    scheduler = module.resource("google_cloud_scheduler_job.refresh")
    oidc = scheduler.block("http_target", "oidc_token")
    assert hcl.reference(oidc["service_account_email"]) not in accounts.values()


def test_the_connect_slot_is_disabled_by_default(module: hcl.Configuration) -> None:
    assert module.variables["connect"]["default"] == {}
    declared = " ".join(module.variables["connect"]["type"].split())
    assert re.search(r"enabled\s*=\s*optional\(bool, false\)", declared), declared
    connect_resources = [
        r.address
        for r in module.resources.values()
        if ("connect" in r.name or r.name == "sessions_ttl") and r.address != OPERATOR_GRANT
    ]
    assert len(connect_resources) == 9, connect_resources
    for address in connect_resources:
        count = module.resource(address).body["count"]
        assert hcl.reference(count) == "var.connect.enabled ? 1 : 0", address


# --- invocation --------------------------------------------------------------------------------


def test_nothing_is_public_anywhere(configurations: list[hcl.Configuration]) -> None:
    for config in configurations:
        for where, value in config.everything():
            for scalar in hcl.walk(value):
                if isinstance(scalar, str):
                    assert "allUsers" not in scalar, (config.directory, where)
                    assert "allAuthenticatedUsers" not in scalar, (config.directory, where)


#: The one grant to people: invoking the connect pages (var.operators, or IAP's agent).
OPERATOR_GRANT = "google_cloud_run_v2_service_iam_member.connect_invoker"


def test_every_iam_grant_names_a_service_account(configurations: list[hcl.Configuration]) -> None:
    """Members are service accounts -- but for the connect pages' invokers, the operators --
    no public principal, and no authoritative ``*_iam_binding``/``*_iam_policy`` that would
    remove others' grants."""
    for config in configurations:
        for resource in config.resources.values():
            assert not re.search(r"_iam_(binding|policy)$", resource.type), resource.address
            if resource.address == OPERATOR_GRANT:
                continue
            if IAM_MEMBER_TYPES_WITH_MEMBER.match(resource.type):
                member = hcl.expand_locals(resource.body["member"], config)
                assert member.startswith("serviceAccount:"), (resource.address, member)


def test_the_connect_pages_are_invoked_by_the_operators_or_iap_only(
    module: hcl.Configuration,
) -> None:
    grant = module.resource(OPERATOR_GRANT)
    assert grant.body["role"] == "roles/run.invoker"
    assert grant.body["member"] == "${each.value}"
    assert hcl.reference(grant.body["for_each"]) == (
        "var.connect.enabled ? toset(local.connect_invokers) : toset([])"
    )
    assert hcl.reference(grant.body["name"]) == "google_cloudfunctions2_function.connect[0].name"
    invokers = " ".join(hcl.reference(module.locals["connect_invokers"]).split())
    assert invokers == (
        'var.connect.identity == "iap" ? ["serviceAccount:service-${local.project_number}'
        '@gcp-sa-iap.iam.gserviceaccount.com"] : var.operators'
    )
    # var.operators: IAM members of a kind, never a public principal.
    condition = module.variables["operators"]["validation"][0]["condition"]
    pattern = re.search(r'regex\("((?:[^"\\]|\\.)*)"', condition)
    assert pattern, condition
    regex = re.compile(ast.literal_eval(f'"{pattern[1]}"'))
    for member in ("user:alice@example.com", "group:ops@example.com", "domain:example.com",
                   "serviceAccount:ops@p.iam.gserviceaccount.com"):  # fmt: skip
        assert regex.search(member), member
    for refused in ("allUsers", "allAuthenticatedUsers", "alice@example.com", "user:a b"):
        assert not regex.search(refused), refused


def test_the_issuers_invokers_are_exactly_the_callers_variable(module: hcl.Configuration) -> None:
    invokers = [
        r
        for r in module.resources.values()
        if r.type.startswith("google_cloud_run") and r.body.get("role") == "roles/run.invoker"
    ]
    on_issuer = [r for r in invokers if "google_cloudfunctions2_function.issuer." in r.body["name"]]
    assert [r.address for r in on_issuer] == [
        "google_cloud_run_v2_service_iam_member.issuer_invoker"
    ]
    (binding,) = on_issuer
    assert hcl.reference(binding.body["for_each"]) == "toset(var.issuer_callers)"
    assert binding.body["member"] == "serviceAccount:${each.value}"
    # No other resource grants invocation on a Cloud Functions or Cloud Run resource.
    for resource in module.resources.values():
        if re.match(r"google_(cloudfunctions2?_function|cloud_run\w*)_iam_", resource.type):
            assert resource in invokers, resource.address


def test_the_callers_variable_accepts_service_accounts_only(module: hcl.Configuration) -> None:
    """The validation's regex (RE2; this one is also a Python regex) run on sample members."""
    condition = module.variables["issuer_callers"]["validation"][0]["condition"]
    pattern = re.search(r'regex\("((?:[^"\\]|\\.)*)"', condition)
    assert pattern, condition
    regex = re.compile(ast.literal_eval(f'"{pattern[1]}"'))
    assert regex.search("crm-sync@acme-prod.iam.gserviceaccount.com")
    for refused in (
        "allUsers",
        "allAuthenticatedUsers",
        "serviceAccount:crm-sync@acme-prod.iam.gserviceaccount.com",
        "alice@example.com",
        "group:ops@example.com",
        "domain:example.com",
    ):
        assert not regex.search(refused), refused


def test_the_refresher_is_invoked_by_the_schedulers_account_only(
    module: hcl.Configuration,
) -> None:
    on_refresher = [
        r
        for r in module.resources.values()
        if r.type.startswith("google_cloud_run")
        and "google_cloudfunctions2_function.refresher." in str(r.body.get("name"))
    ]
    assert [r.address for r in on_refresher] == [
        "google_cloud_run_v2_service_iam_member.refresher_invoker"
    ]
    (binding,) = on_refresher
    assert binding.body["role"] == "roles/run.invoker"
    assert "for_each" not in binding.body and "count" not in binding.body
    assert binding.body["member"] == "serviceAccount:${google_service_account.scheduler.email}"


def test_the_scheduler_calls_the_refreshers_url_with_an_oidc_token_for_it(
    module: hcl.Configuration,
) -> None:
    job = module.resource("google_cloud_scheduler_job.refresh")
    target = job.block("http_target")
    url = "google_cloudfunctions2_function.refresher.service_config[0].uri"
    assert hcl.reference(target["uri"]) == url
    (oidc,) = target["oidc_token"]
    assert hcl.reference(oidc["audience"]) == url
    assert "oauth_token" not in target
    assert target["http_method"] == "POST"
    # With a body, Scheduler would send application/octet-stream: the body is JSON and says so.
    assert target["headers"] == {"Content-Type": "application/json"}
    assert hcl.reference(target["body"]) == "base64encode(var.refresh_payload)"
    # The refresher's HTTP target is the entry point that takes Scheduler's request.
    refresher = _functions(module)["refresher"]
    assert refresher.block("build_config")["entry_point"] == "refresh_http"


def test_the_entry_points_exist_with_the_signature_their_trigger_needs() -> None:
    """The build's entry points name decorated functions of the sources the package step zips."""
    decorated = {}
    for name in ("refresher", "issuer", "connect"):
        tree = ast.parse((hcl.ROOT / "functions" / name / "main.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                decorated[node.name] = [ast.unparse(d) for d in node.decorator_list]
    assert decorated["refresh_http"] == ["functions_framework.http"]
    assert decorated["issue"] == ["aio.http"]
    assert decorated["connect_http"] == ["functions_framework.http"]
    connect = _functions(module_of_root())["connect"]
    assert hcl.reference(connect.block("build_config")["entry_point"]) == "var.connect.entry_point"
    declared = " ".join(module_of_root().variables["connect"]["type"].split())
    assert 'entry_point = optional(string, "connect_http")' in declared


def test_ingress_is_internal_where_it_fits(module: hcl.Configuration) -> None:
    functions = _functions(module)
    refresher = functions["refresher"].block("service_config")["ingress_settings"]
    assert refresher == "ALLOW_INTERNAL_ONLY"
    # The connect pages: open ingress only in platform mode, where invoker IAM is the gate and
    # gcloud run services proxy comes from outside; behind IAP the load balancer only.
    connect = functions["connect"].block("service_config")["ingress_settings"]
    assert hcl.reference(connect) == "local.connect_ingress"
    assert " ".join(hcl.reference(module.locals["connect_ingress"]).split()) == (
        'var.connect.ingress != null ? var.connect.ingress : (var.connect.identity == "iap" ? '
        '"ALLOW_INTERNAL_AND_GCLB" : "ALLOW_ALL")'
    )
    issuer = functions["issuer"].block("service_config")["ingress_settings"]
    assert hcl.reference(issuer) == "var.issuer_ingress"
    assert _default(module, "issuer_ingress") == "ALLOW_INTERNAL_ONLY"


# --- the issuer's identity mode ---------------------------------------------------------------


def test_the_issuers_identity_mode_and_audiences_are_set_by_the_module(
    module: hcl.Configuration,
) -> None:
    env = _environment(module, "issuer")
    assert hcl.reference(env[settings.ENV_CALLER_IDENTITY]) == "var.issuer_caller_identity"
    assert _default(module, "issuer_caller_identity") == "platform"
    assert hcl.reference(env[settings.ENV_ISSUER_AUDIENCE]) == 'join(",", local.issuer_audiences)'
    audiences = hcl.reference(module.locals["issuer_audiences"])
    name = module.locals["functions"]["issuer"]
    assert hcl.reference(_functions(module)["issuer"].body["name"]) == "local.functions.issuer"
    # The function's two URLs (docs/issuer.md): cloudfunctions.net and its run.app URL, both
    # for the function's own name, then the operator's extra ones.
    assert (
        '"https://${var.region}-${var.project_id}.cloudfunctions.net/${local.functions.issuer}"'
        in audiences
    )
    assert '"https://${local.functions.issuer}-${local.project_number}.${var.region}.run.app"' in (
        audiences
    )
    assert audiences.rstrip(")").rstrip().endswith("var.issuer_extra_audiences")
    assert name == "${var.name}-issuer"
    assert env[settings.ENV_POLICY_FILE] == "${local.policy_mount}/${local.policy_file}"


def test_public_ingress_is_refused_in_platform_mode(module: hcl.Configuration) -> None:
    """Platform mode trusts whatever Cloud Run's IAM front end let through (docs/issuer.md);
    public ingress is allowed only beside the issuer's own signature check (verify)."""
    issuer = _functions(module)["issuer"]
    conditions = [p["condition"] for p in issuer.body["lifecycle"][0]["precondition"]]
    assert (
        '${var.issuer_ingress != "ALLOW_ALL" || var.issuer_caller_identity == "verify"}'
        in conditions
    )
    identity = module.variables["issuer_caller_identity"]["validation"][0]["condition"]
    assert identity == '${contains(["platform", "verify"], var.issuer_caller_identity)}'
    assert tuple(re.findall(r'"(\w+)"', identity)) == settings.CALLER_IDENTITIES


def test_every_environment_variable_is_a_setting_the_broker_reads(
    module: hcl.Configuration,
) -> None:
    known = {
        value
        for name, value in vars(settings).items()
        if name.startswith("ENV_") and isinstance(value, str)
    }
    # Fan-out's two settings, read by the refresher's entry point (until settings.py has them).
    known |= {refresher.ENV_FANOUT_SHARDS, refresher.ENV_FANOUT_TOPIC}
    for function in ("refresher", "refresher_worker", "issuer", "connect"):
        env = _environment(module, function)
        assert set(env) <= known, set(env) - known
        assert env[settings.ENV_BACKEND] == "gcp"
        assert env[settings.ENV_GCP_PROJECT] == "${var.project_id}"
        assert env[settings.ENV_SECRET_PREFIX] == "${var.secret_prefix}"
        assert env[settings.ENV_FIRESTORE_DATABASE] == "${var.firestore_database}"
        assert env[settings.ENV_FIRESTORE_COLLECTION] == "${var.firestore_collection}"
        assert env[settings.ENV_PUBSUB_TOPIC] == "${var.pubsub_topic}"
        # Never a test server or emulator in production.
        for test_only in (
            settings.ENV_SECRET_MANAGER_ENDPOINT,
            settings.ENV_FIRESTORE_EMULATOR_HOST,
            settings.ENV_FAILPOINTS,
            settings.ENV_IAM_ACCESS_TOKEN,
        ):
            assert test_only not in env


def test_the_defaults_are_the_brokers_own(module: hcl.Configuration) -> None:
    """Names an operator's CLI uses unconfigured must be the deployment's too."""
    defaults = settings.Settings()
    assert _default(module, "secret_prefix") == defaults.secret_prefix
    assert _default(module, "firestore_collection") == defaults.firestore_collection
    assert _default(module, "pubsub_topic") == defaults.pubsub_topic
    assert _default(module, "runtime") == "python312"


# --- secrets ---------------------------------------------------------------------------------


def test_every_secret_permission_is_scoped_to_the_brokers_secrets(
    module: hcl.Configuration,
) -> None:
    """Project-level secret grants carry the prefix condition; per-secret grants name a secret
    the module creates; no predefined Secret Manager role is granted project-wide."""
    custom_roles = {
        f"${{google_project_iam_custom_role.{r.name}.name}}": r.body["permissions"]
        for r in module.of_type("google_project_iam_custom_role")
    }
    expected = (
        'resource.name.startsWith("projects/${data.google_project.this.number}/secrets/'
        '${var.secret_prefix}")'
    )
    seen = []
    for resource in module.resources.values():
        role = resource.body.get("role")
        if not isinstance(role, str):
            continue
        permissions = custom_roles.get(role, [role])
        if not any(SECRET_ROLE.search(p) for p in permissions):
            continue
        seen.append(resource.address)
        if resource.type == "google_project_iam_member":
            condition = resource.block("condition")["expression"]
            assert hcl.expand_locals(condition, module) == expected, resource.address
        else:
            assert resource.type == "google_secret_manager_secret_iam_member", resource.address
            secret = hcl.reference(resource.body["secret_id"])
            assert re.fullmatch(r"google_secret_manager_secret\.\w+(\[0\])?\.secret_id", secret)
    assert sorted(seen) == [
        "google_project_iam_member.connect_secrets",
        "google_project_iam_member.issuer_secrets",
        "google_project_iam_member.refresher_secrets",
        "google_secret_manager_secret_iam_member.connect_session_key",
        "google_secret_manager_secret_iam_member.issuer_policy",
    ]
    # The prefix may not be empty (an empty prefix would be every secret of the project).
    assert "{3,200}" in module.variables["secret_prefix"]["validation"][0]["condition"]


def test_the_secret_roles_hold_what_each_function_calls_and_no_more(
    module: hcl.Configuration,
) -> None:
    """The pointer protocol's calls (the current version is in the Firestore record): no
    function reads or writes a secret's metadata, nor disables a version; the issuer only
    reads. test_terraform_secret_permissions.py runs the protocol with exactly these."""
    refresher = module.resource("google_project_iam_custom_role.refresher_secrets")
    issuer = module.resource("google_project_iam_custom_role.issuer_secrets")
    assert set(issuer.body["permissions"]) == {
        "secretmanager.versions.access",
        "secretmanager.versions.list",
    }
    assert set(refresher.body["permissions"]) == {
        "secretmanager.versions.access",
        "secretmanager.versions.add",
        "secretmanager.versions.destroy",
        "secretmanager.versions.list",
    }
    for role in (refresher, issuer):
        permissions = role.body["permissions"]
        assert not any(p.startswith("secretmanager.secrets.") for p in permissions)
        assert not any(p.endswith(("setIamPolicy", ".delete", ".create")) for p in permissions)


def test_every_function_runs_the_stores_the_secret_roles_are_cut_for(
    module: hcl.Configuration,
) -> None:
    """Secret Manager with its pointer in Firestore, pinned by the module (the operator's
    extras come first and cannot change it)."""
    for function in ("refresher", "issuer", "connect"):
        env = _environment(module, function)
        assert env[settings.ENV_BACKEND] == "gcp", function
        assert env[settings.ENV_SECRET_STORE] == "secret-manager", function
        assert env[settings.ENV_STATE_STORE] == "firestore", function


def test_the_refresher_and_the_cli_get_the_secret_manager_budget(
    module: hcl.Configuration,
) -> None:
    budget = {
        settings.ENV_SECRET_MANAGER_READS_PER_MINUTE: (
            "${tostring(var.secret_manager_reads_per_minute)}"
        ),
        settings.ENV_SECRET_MANAGER_WRITES_PER_MINUTE: (
            "${tostring(var.secret_manager_writes_per_minute)}"
        ),
    }
    refresher = _environment(module, "refresher")
    assert {k: refresher[k] for k in budget} == budget
    assert hcl.reference(module.outputs["cli_environment"]["value"]) == "local.cli_environment"
    assert hcl.reference(module.locals["cli_environment"]) == (
        "merge(local.common_environment, local.secret_manager_quota_environment)"
    )
    for name in ("secret_manager_reads_per_minute", "secret_manager_writes_per_minute"):
        assert module.variables[name]["type"] == "number"
        assert module.variables[name]["default"] == 600


def test_the_policy_secret_lies_outside_the_connections_prefix(module: hcl.Configuration) -> None:
    secret = module.resource("google_secret_manager_secret.issuer_policy")
    secret_id = secret.body["secret_id"]
    assert secret_id == '${replace(var.name, "-", "_")}_issuer_policy'
    # With the defaults: tokenbroker_issuer_policy, not under tokenbroker-.
    rendered = _default(module, "name").replace("-", "_") + "_issuer_policy"
    assert not rendered.startswith(_default(module, "secret_prefix"))


# --- the other grants ------------------------------------------------------------------------


def test_firestore_and_pubsub_grants_are_as_narrow_as_the_apis_allow(
    module: hcl.Configuration,
) -> None:
    for function in ("refresher", "issuer", "connect"):
        grant = module.resource(f"google_project_iam_member.{function}_firestore")
        assert grant.body["role"] == "roles/datastore.user"
        index = "[0]" if function == "connect" else ""
        assert grant.body["member"] == (
            f"serviceAccount:${{google_service_account.{function}{index}.email}}"
        )
        condition = hcl.expand_locals(grant.block("condition")["expression"], module)
        assert (
            condition
            == 'resource.name == "projects/${var.project_id}/databases/${var.firestore_database}"'
        )
    publishers = [
        r for r in module.resources.values() if r.body.get("role") == "roles/pubsub.publisher"
    ]
    by_member = {r.body["member"]: r for r in publishers}
    refresher = by_member["serviceAccount:${google_service_account.refresher.email}"]
    assert refresher.type == "google_pubsub_topic_iam_member"
    assert refresher.body["topic"] == "${google_pubsub_topic.events.name}"
    connect_publisher = by_member["serviceAccount:${google_service_account.connect[0].email}"]
    assert connect_publisher.body["topic"] == "${google_pubsub_topic.events.name}"
    # The issuer publishes nothing and may impersonate only the listed accounts.
    for resource in module.resources.values():
        if resource.body.get("member") == "serviceAccount:${google_service_account.issuer.email}":
            assert resource.body["role"] in {
                "${google_project_iam_custom_role.issuer_secrets.name}",
                "roles/secretmanager.secretAccessor",
                "roles/datastore.user",
                "roles/iam.serviceAccountTokenCreator",
                "roles/monitoring.metricWriter",  # its metrics (test_terraform_monitoring.py)
            }, resource.address
    creator = module.resource("google_service_account_iam_member.issuer_token_creator")
    assert (
        hcl.reference(creator.body["for_each"]) == "toset(var.issuer_impersonated_service_accounts)"
    )
    assert creator.body["service_account_id"] == "projects/-/serviceAccounts/${each.value}"
    assert not [
        r
        for r in module.of_type("google_project_iam_member")
        if r.body["role"] in {"roles/iam.serviceAccountTokenCreator", "roles/pubsub.publisher"}
    ]


def test_the_connect_function_holds_what_the_refresher_holds_and_its_key(
    module: hcl.Configuration,
) -> None:
    """It stores credentials as a refresh does (the refresher's secret role, same prefix),
    writes the state and the sessions (the database), publishes connection events, and reads
    its own session key: nothing else, and nothing the refresher lacks but the key."""
    member = "serviceAccount:${google_service_account.connect[0].email}"
    grants = {
        r.address: r.body["role"]
        for r in module.resources.values()
        if r.body.get("member") == member
    }
    assert grants == {
        "google_project_iam_member.connect_secrets": (
            "${google_project_iam_custom_role.refresher_secrets.name}"
        ),
        "google_project_iam_member.connect_firestore": "roles/datastore.user",
        "google_pubsub_topic_iam_member.connect_publisher": "roles/pubsub.publisher",
        "google_secret_manager_secret_iam_member.connect_session_key": (
            "roles/secretmanager.secretAccessor"
        ),
    }
    key = module.resource("google_secret_manager_secret_iam_member.connect_session_key")
    assert key.body["secret_id"] == (
        "${google_secret_manager_secret.connect_session_key[0].secret_id}"
    )
    function = _functions(module)["connect"].block("service_config")
    (secret_env,) = function["secret_environment_variables"]
    assert secret_env["key"] == settings.ENV_SESSION_KEY
    assert (
        secret_env["secret"] == "${google_secret_manager_secret.connect_session_key[0].secret_id}"
    )
    # The key's id lies outside the connections' prefix (the refresher cannot read it).
    secret = module.resource("google_secret_manager_secret.connect_session_key")
    assert secret.body["secret_id"] == '${replace(var.name, "-", "_")}_connect_session_key'
    version = module.resource("google_secret_manager_secret_version.connect_session_key")
    assert version.body["lifecycle"][0]["ignore_changes"] == ["${secret_data}"] or version.body[
        "lifecycle"
    ][0]["ignore_changes"] == ["secret_data"]


def test_the_connect_functions_identity_settings_are_the_modules(
    module: hcl.Configuration,
) -> None:
    env = _environment(module, "connect")
    assert env[settings.ENV_BACKEND] == "gcp"
    assert env[settings.ENV_CONNECT_URL] == "${var.connect.public_url}"
    assert env[settings.ENV_OPERATOR_IDENTITY] == "${var.connect.identity}"
    assert hcl.reference(env[settings.ENV_CONNECT_OPERATORS]) == (
        'join(",", local.connect_allowed_operators)'
    )
    identity = module.variables["connect"]["validation"][1]["condition"]
    assert tuple(re.findall(r'"(\w+)"', identity)) == settings.OPERATOR_IDENTITIES


# --- state and events --------------------------------------------------------------------------


def test_the_firestore_index_serves_the_due_selection(module: hcl.Configuration) -> None:
    """The full check against the adapter's queries runs on the emulator
    (tests/system/test_firestore_state.py); this one needs nothing but the files."""
    indexes = {i.name: i for i in module.of_type("google_firestore_index")}
    assert set(indexes) == {"due", "due_in_shard"}
    due = [("status", "ASCENDING"), ("next_refresh_at", "ASCENDING")]
    due.append(("lease_expires_at", "ASCENDING"))
    sharded = [due[0], ("bucket", "ASCENDING"), *due[1:], ("slot", "ASCENDING")]
    for name, fields in (("due", due), ("due_in_shard", sharded)):
        index = indexes[name]
        assert index.body["collection"] == "${var.firestore_collection}"
        assert index.body["query_scope"] == "COLLECTION"
        assert [(f["field_path"], f["order"]) for f in index.body["fields"]] == fields
    assert not list(hcl.TERRAFORM.glob("firestore.indexes.json"))


def test_the_budgets_collection_group_has_a_ttl_on_expires_at(module: hcl.Configuration) -> None:
    field = module.resource("google_firestore_field.budgets_ttl")
    assert field.body["collection"] == "${var.firestore_collection}" + BUDGETS_SUFFIX
    assert field.body["field"] == "expires_at"
    assert field.body["ttl_config"] == [{}]


def test_the_connect_sessions_have_a_ttl_on_expires_at(module: hcl.Configuration) -> None:
    """The sessions' collection is the adapter's (the state collection + its suffix) and the
    TTL policy is on the field the adapter writes its expiry to; the purge's range query keeps
    the field's index (no ``index_config`` exemption)."""
    field = module.resource("google_firestore_field.sessions_ttl")
    assert hcl.reference(field.body["count"]) == "var.connect.enabled ? 1 : 0"
    assert field.body["collection"] == "${local.sessions_collection}"
    assert module.locals["sessions_collection"] == "${var.firestore_collection}" + SESSIONS_SUFFIX
    assert field.body["field"] == "expires_at"
    assert field.body["ttl_config"] == [{}]
    assert "index_config" not in field.body
    env = _environment(module, "connect")
    assert env[settings.ENV_SESSIONS_COLLECTION] == "${local.sessions_collection}"


def test_the_example_subscription_dead_letters_and_the_service_agent_may_forward(
    module: hcl.Configuration,
) -> None:
    subscription = module.resource("google_pubsub_subscription.example")
    assert subscription.body["topic"] == "${google_pubsub_topic.events.id}"
    policy = subscription.block("dead_letter_policy")
    assert policy["dead_letter_topic"] == "${google_pubsub_topic.dead_letter.id}"
    agent = "serviceAccount:service-${local.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
    assert module.locals["pubsub_service_agent"] == agent
    publisher = module.resource("google_pubsub_topic_iam_member.dead_letter_publisher")
    subscriber = module.resource("google_pubsub_subscription_iam_member.dead_letter_subscriber")
    assert (publisher.body["topic"], publisher.body["member"]) == (
        "${google_pubsub_topic.dead_letter.name}",
        "${local.pubsub_service_agent}",
    )
    assert (subscriber.body["subscription"], subscriber.body["member"]) == (
        "${google_pubsub_subscription.example[0].name}",
        "${local.pubsub_service_agent}",
    )


def test_every_api_the_resources_need_is_enabled(module: hcl.Configuration) -> None:
    apis = module.resource("google_project_service.apis")
    enabled = set(re.findall(r'"([a-z]+\.googleapis\.com)"', apis.body["for_each"]))
    needed = {
        "google_cloudfunctions2_function": {
            "cloudfunctions.googleapis.com",
            "cloudbuild.googleapis.com",
            "artifactregistry.googleapis.com",
            "run.googleapis.com",
        },
        "google_cloud_scheduler_job": {"cloudscheduler.googleapis.com"},
        "google_firestore_database": {"firestore.googleapis.com"},
        "google_pubsub_topic": {"pubsub.googleapis.com"},
        "google_secret_manager_secret": {"secretmanager.googleapis.com"},
        "google_service_account": {"iam.googleapis.com"},
        "google_storage_bucket": {"storage.googleapis.com"},
        "google_monitoring_alert_policy": {"monitoring.googleapis.com"},
        "google_monitoring_dashboard": {"monitoring.googleapis.com"},
        "google_monitoring_metric_descriptor": {"monitoring.googleapis.com"},
    }
    for resource_type, apis_needed in needed.items():
        assert module.of_type(resource_type), resource_type
        assert apis_needed <= enabled, (resource_type, apis_needed - enabled)
    # The issuer's service-account connections call IAM Credentials (generateAccessToken).
    assert "iamcredentials.googleapis.com" in enabled
    assert apis.body["disable_on_destroy"] is False


def test_the_example_root_calls_the_module_with_the_package_zips() -> None:
    example = hcl.load(hcl.TERRAFORM / "examples" / "basic")
    call = example.modules["tokenbroker"]
    assert call["source"] == "../../modules/tokenbroker"
    assert call["refresher_source_zip"].endswith("/dist/functions/refresher.zip")
    assert call["issuer_source_zip"].endswith("/dist/functions/issuer.zip")
    required = {n for n, v in hcl.load(hcl.MODULE).variables.items() if "default" not in v}
    assert required <= set(call), required - set(call)
