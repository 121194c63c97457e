# The tokenbroker deployment: the refresher and the issuer as Cloud Functions (gen2), each
# with its own service account; Firestore state, Secret Manager credentials, Pub/Sub events;
# a Cloud Scheduler job that runs the refresh tick. Names and settings follow
# shared/tokenbroker/entrypoints/settings.py and docs/gcp.md.

data "google_project" "this" {
  project_id = var.project_id
}

locals {
  project_number = data.google_project.this.number

  functions = {
    refresher        = "${var.name}-refresher"
    refresher_worker = "${var.name}-refresher-worker"
    issuer           = "${var.name}-issuer"
    connect          = "${var.name}-connect"
  }

  # Secret Manager names secrets by project NUMBER in IAM conditions' resource.name
  # (https://cloud.google.com/iam/docs/conditions-resource-attributes#resource-name), and a
  # version's name starts with its secret's: one prefix covers both.
  secret_name_prefix = "projects/${local.project_number}/secrets/${var.secret_prefix}"
  secrets_condition  = "resource.name.startsWith(\"${local.secret_name_prefix}\")"

  # Firestore IAM conditions name the database
  # (https://cloud.google.com/firestore/docs/security/iam#iam_conditions).
  database_name      = "projects/${var.project_id}/databases/${var.firestore_database}"
  database_condition = "resource.name == \"${local.database_name}\""

  # A gen2 function answers on its cloudfunctions.net URL and on its Cloud Run URLs; callers'
  # ID tokens may carry any of them as audience (docs/issuer.md). Both of these are known
  # before the function exists (the deterministic run.app URL:
  # https://cloud.google.com/run/docs/triggering/https-request#deterministic).
  issuer_audiences = concat(
    [
      "https://${var.region}-${var.project_id}.cloudfunctions.net/${local.functions.issuer}",
      "https://${local.functions.issuer}-${local.project_number}.${var.region}.run.app",
    ],
    var.issuer_extra_audiences,
  )

  policy_mount = "/etc/tokenbroker/policy"
  policy_file  = "policy.toml"

  # What both functions read (settings.py): the gcp preset and where its parts are.
  common_environment = {
    TOKENBROKER_BACKEND = "gcp"
    # The preset's stores, pinned: with the state in Firestore, Secret Manager keeps the
    # current version in the state record (the pointer protocol, secret_manager_pointed.py),
    # which is what iam.tf's secret roles are cut for.
    TOKENBROKER_SECRET_STORE         = "secret-manager"
    TOKENBROKER_STATE_STORE          = "firestore"
    TOKENBROKER_GCP_PROJECT          = var.project_id
    TOKENBROKER_SECRET_PREFIX        = var.secret_prefix
    TOKENBROKER_FIRESTORE_DATABASE   = var.firestore_database
    TOKENBROKER_FIRESTORE_COLLECTION = var.firestore_collection
    TOKENBROKER_PUBSUB_TOPIC         = var.pubsub_topic
    TOKENBROKER_LOG_LEVEL            = var.log_level
    # The metrics' generic_task resource: namespace and location (monitoring.tf filters on the
    # namespace).
    TOKENBROKER_METRICS_NAMESPACE = var.name
    TOKENBROKER_REGION            = var.region
  }

  # Secret Manager's request quotas the refresher paces itself by (settings.py,
  # tokenbroker.ports.RequestQuota). Every refresher of the deployment and its CLI spend one
  # budget, kept in Firestore, so the CLI gets the same figures (cli_environment).
  secret_manager_quota_environment = {
    TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE  = tostring(var.secret_manager_reads_per_minute)
    TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE = tostring(var.secret_manager_writes_per_minute)
  }

  # Fan-out (fanout.tf): the scheduled tick publishes fanout_shards shard messages (1: off, the
  # refresher refreshes). Read by entrypoints/refresher.py.
  fanout_enabled = var.fanout_shards > 1
  fanout_topic   = "${var.name}-fanout"
  fanout_environment = {
    TOKENBROKER_FANOUT_SHARDS = tostring(var.fanout_shards)
    TOKENBROKER_FANOUT_TOPIC  = local.fanout_topic
  }

  # The module's settings win over var.refresher_environment.
  refresher_environment = merge(var.refresher_environment, local.common_environment, local.secret_manager_quota_environment, local.fanout_environment)
  # The worker runs shards; it never fans out (no TOKENBROKER_FANOUT_*).
  refresher_worker_environment = merge(var.refresher_environment, local.common_environment, local.secret_manager_quota_environment)

  # The operator's CLI (`tokenbroker refresh` spends the same budget as the refresher).
  cli_environment = merge(local.common_environment, local.secret_manager_quota_environment)

  # Who verifies callers, and for which audiences: set by the module, never by
  # var.issuer_environment (merged first, so these win).
  issuer_identity_environment = {
    TOKENBROKER_CALLER_IDENTITY = var.issuer_caller_identity
    TOKENBROKER_ISSUER_AUDIENCE = join(",", local.issuer_audiences)
    TOKENBROKER_POLICY_FILE     = "${local.policy_mount}/${local.policy_file}"
  }

  issuer_environment = merge(var.issuer_environment, local.common_environment, local.issuer_identity_environment)

  # The connect function. Who reaches it: the operators (platform mode) or the IAP service agent
  # (iap mode: IAP invokes the service; https://cloud.google.com/iap/docs/enabling-cloud-run).
  # Who, of those, may connect accounts: the function's own allow-list (groups cannot be checked
  # by the function, so they only open the door).
  connect_invokers = var.connect.identity == "iap" ? [
    "serviceAccount:service-${local.project_number}@gcp-sa-iap.iam.gserviceaccount.com",
  ] : var.operators
  connect_allowed_operators = var.connect.allowed_operators != null ? var.connect.allowed_operators : [
    for member in var.operators : member if !startswith(member, "group:")
  ]
  connect_ingress = var.connect.ingress != null ? var.connect.ingress : (
    var.connect.identity == "iap" ? "ALLOW_INTERNAL_AND_GCLB" : "ALLOW_ALL"
  )
  # The sessions' collection (firestore_sessions.py): the TTL policy's too.
  sessions_collection = "${var.firestore_collection}_authorization_sessions"

  # Platform mode: the ID token audiences accepted -- the function's two URLs and gcloud's
  # OAuth client, which is the aud of a user's token from `gcloud run services proxy`.
  connect_audiences = [
    var.connect.public_url,
    "https://${var.region}-${var.project_id}.cloudfunctions.net/${local.functions.connect}",
    "https://${local.functions.connect}-${local.project_number}.${var.region}.run.app",
    "32555940559.apps.googleusercontent.com",
  ]

  connect_identity_environment = {
    TOKENBROKER_CONNECT_URL         = var.connect.public_url
    TOKENBROKER_CONNECT_AUDIENCE    = join(",", local.connect_audiences)
    TOKENBROKER_OPERATOR_IDENTITY   = var.connect.identity
    TOKENBROKER_CONNECT_OPERATORS   = join(",", local.connect_allowed_operators)
    TOKENBROKER_IAP_AUDIENCE        = var.connect.iap_audience != null ? var.connect.iap_audience : ""
    TOKENBROKER_SESSIONS_COLLECTION = local.sessions_collection
  }

  connect_environment = merge(local.common_environment, local.connect_identity_environment)

  labels = merge(var.labels, { managed-by = "terraform", app = var.name })
}

resource "google_project_service" "apis" {
  for_each = var.enable_apis ? toset([
    "artifactregistry.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "cloudscheduler.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "iamcredentials.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "secretmanager.googleapis.com",
    "storage.googleapis.com",
  ]) : toset([])

  project = var.project_id
  service = each.value
  # Other workloads of the project may use these APIs too.
  disable_on_destroy = false
}
