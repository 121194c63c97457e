# Least privilege, per function. Nothing here names allUsers or allAuthenticatedUsers.
#
# Secrets: the connections' secrets are created at run time (one per connection, by the CLI
# when a connection is added), so Terraform cannot bind on each of them. The grants are
# project-level custom roles with an IAM condition on the secret name prefix instead: they cover
# exactly the secrets whose id starts with var.secret_prefix, and their versions, whenever they
# are created. (Anyone who may create secrets in the project can create one under the prefix
# and have the functions read it: keep secret creation to the operators, or use a project of
# the broker's own.)

# Cut for the pointer protocol (shared/tokenbroker/adapters/gcp/secret_manager_pointed.py),
# which the deployed composition uses (main.tf pins Secret Manager with the state in
# Firestore): the current version is in the Firestore record, not on the secret, so no
# function reads or writes the secret's metadata (no secrets.get or secrets.update), and old
# versions are destroyed, never disabled. tests/deploy/test_terraform_secret_permissions.py
# runs the protocol's refreshes and reads, crash leftovers included, on the Secret Manager
# test server with exactly these permissions. (The annotation protocol, secret_manager.py,
# would need secrets.get, secrets.update and versions.disable too; it is not deployed.)
resource "google_project_iam_custom_role" "refresher_secrets" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_refresher_secrets"
  title       = "tokenbroker refresher: connection secrets"
  description = "Read, stage and retire versions of the broker's secrets; the current version is in the Firestore record (docs/gcp.md, the pointer protocol)."
  permissions = [
    "secretmanager.versions.access",  # AccessSecretVersion: latest, or down a crashed chain
    "secretmanager.versions.add",     # AddSecretVersion: each refresh's answer, staged
    "secretmanager.versions.destroy", # DestroySecretVersion: what retention drops, losers
    "secretmanager.versions.list",    # ListSecretVersions: after a lost race or a crash
  ]
}

resource "google_project_iam_custom_role" "issuer_secrets" {
  project     = var.project_id
  role_id     = "${replace(var.name, "-", "_")}_issuer_secrets"
  title       = "tokenbroker issuer: connection secrets"
  description = "Read the current version of the broker's secrets (the pointer is in the Firestore record): the version's payload, and the list of versions to read past a losing writer's version on top."
  permissions = [
    "secretmanager.versions.access",
    "secretmanager.versions.list",
  ]
}

resource "google_project_iam_member" "refresher_secrets" {
  project = var.project_id
  role    = google_project_iam_custom_role.refresher_secrets.name
  member  = "serviceAccount:${google_service_account.refresher.email}"
  condition {
    title       = "tokenbroker secrets only"
    description = "Secrets whose id starts with ${var.secret_prefix}, and their versions."
    expression  = local.secrets_condition
  }
}

resource "google_project_iam_member" "issuer_secrets" {
  project = var.project_id
  role    = google_project_iam_custom_role.issuer_secrets.name
  member  = "serviceAccount:${google_service_account.issuer.email}"
  condition {
    title       = "tokenbroker secrets only"
    description = "Secrets whose id starts with ${var.secret_prefix}, and their versions."
    expression  = local.secrets_condition
  }
}

# The connect function stores what a refresh stores (a new credential version, the old ones
# retired), so it holds the refresher's secret role, on the same prefix.
resource "google_project_iam_member" "connect_secrets" {
  count   = var.connect.enabled ? 1 : 0
  project = var.project_id
  role    = google_project_iam_custom_role.refresher_secrets.name
  member  = "serviceAccount:${google_service_account.connect[0].email}"
  condition {
    title       = "tokenbroker secrets only"
    description = "Secrets whose id starts with ${var.secret_prefix}, and their versions."
    expression  = local.secrets_condition
  }
}

# The session key: one secret, one binding, the connect function only.
resource "google_secret_manager_secret_iam_member" "connect_session_key" {
  count     = var.connect.enabled ? 1 : 0
  project   = var.project_id
  secret_id = google_secret_manager_secret.connect_session_key[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.connect[0].email}"
}

# The policy file: one secret, one binding, the issuer only.
resource "google_secret_manager_secret_iam_member" "issuer_policy" {
  project   = var.project_id
  secret_id = google_secret_manager_secret.issuer_policy.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = "serviceAccount:${google_service_account.issuer.email}"
}

# Firestore: roles/datastore.user is granted on the project (Firestore has no per-collection
# IAM); the condition narrows it to the broker's database. The issuer needs writes too: a
# narrowing refresh takes the connection's lease (docs/issuer.md).
resource "google_project_iam_member" "refresher_firestore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.refresher.email}"
  condition {
    title       = "tokenbroker database only"
    description = "The Firestore database ${var.firestore_database}."
    expression  = local.database_condition
  }
}

resource "google_project_iam_member" "connect_firestore" {
  count   = var.connect.enabled ? 1 : 0
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.connect[0].email}"
  condition {
    title       = "tokenbroker database only"
    description = "The Firestore database ${var.firestore_database}."
    expression  = local.database_condition
  }
}

resource "google_project_iam_member" "issuer_firestore" {
  project = var.project_id
  role    = "roles/datastore.user"
  member  = "serviceAccount:${google_service_account.issuer.email}"
  condition {
    title       = "tokenbroker database only"
    description = "The Firestore database ${var.firestore_database}."
    expression  = local.database_condition
  }
}

# Events: publish to the events topic only.
resource "google_pubsub_topic_iam_member" "refresher_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.refresher.email}"
}

# connection.connected / connection.recovered.
resource "google_pubsub_topic_iam_member" "connect_publisher" {
  count   = var.connect.enabled ? 1 : 0
  project = var.project_id
  topic   = google_pubsub_topic.events.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.connect[0].email}"
}

# Service-account connections: the issuer mints access tokens for exactly these accounts
# (generateAccessToken), one binding on each account, none on the project.
resource "google_service_account_iam_member" "issuer_token_creator" {
  for_each = toset(var.issuer_impersonated_service_accounts)

  service_account_id = "projects/-/serviceAccounts/${each.value}"
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${google_service_account.issuer.email}"
}

# The connect pages: the operators (platform mode) or the IAP service agent (iap mode), the one
# place the module grants people anything. var.operators refuses allUsers/allAuthenticatedUsers.
resource "google_cloud_run_v2_service_iam_member" "connect_invoker" {
  for_each = var.connect.enabled ? toset(local.connect_invokers) : toset([])

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.connect[0].name
  role     = "roles/run.invoker"
  member   = each.value
}

# Invocation: a gen2 function is a Cloud Run service; invoking it needs roles/run.invoker on
# that service (https://cloud.google.com/functions/docs/securing/authenticating).
resource "google_cloud_run_v2_service_iam_member" "issuer_invoker" {
  for_each = toset(var.issuer_callers)

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.issuer.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${each.value}"
}

resource "google_cloud_run_v2_service_iam_member" "refresher_invoker" {
  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.refresher.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.scheduler.email}"
}
