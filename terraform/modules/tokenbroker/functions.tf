# The functions' sources: the package step's zips (scripts/package), uploaded as objects named
# by their content, so a changed package is a new object and a new revision.

resource "google_storage_bucket" "sources" {
  #checkov:skip=CKV_GCP_62: access logs of a bucket that holds only build inputs uploaded by Terraform add nothing; Cloud Audit Logs record who changed it
  project                     = var.project_id
  name                        = "${var.project_id}-${var.name}-sources"
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = true
  labels                      = local.labels

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      num_newer_versions = 3
    }
    action {
      type = "Delete"
    }
  }
}

locals {
  sources = merge(
    {
      refresher = var.refresher_source_zip
      issuer    = var.issuer_source_zip
    },
    var.connect.enabled ? { connect = var.connect.source_zip } : {},
  )
}

resource "google_storage_bucket_object" "source" {
  for_each = local.sources

  bucket = google_storage_bucket.sources.name
  name   = "${each.key}-${filemd5(each.value)}.zip"
  source = each.value
}

# The issuer's policy, as a secret mounted into the function (docs/policy.md). Its id is outside
# the connections' prefix, so only the issuer can read it.
resource "google_secret_manager_secret" "issuer_policy" {
  project   = var.project_id
  secret_id = "${replace(var.name, "-", "_")}_issuer_policy"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "issuer_policy" {
  secret      = google_secret_manager_secret.issuer_policy.id
  secret_data = var.issuer_policy_toml
}

resource "google_cloudfunctions2_function" "refresher" {
  project     = var.project_id
  location    = var.region
  name        = local.functions.refresher
  description = "tokenbroker refresher: one refresh tick per Cloud Scheduler call."
  labels      = local.labels

  build_config {
    runtime         = var.runtime
    entry_point     = "refresh_http"
    service_account = var.build_service_account
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["refresher"].name
      }
    }
  }

  service_config {
    available_memory                 = var.refresher.memory
    available_cpu                    = var.refresher.cpu
    timeout_seconds                  = var.refresher.timeout_seconds
    min_instance_count               = var.refresher.min_instances
    max_instance_count               = var.refresher.max_instances
    max_instance_request_concurrency = var.refresher.concurrency
    # Cloud Scheduler in the same project is internal traffic
    # (https://cloud.google.com/run/docs/securing/ingress#settings).
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.refresher.email
    environment_variables          = local.refresher_environment
  }

  # Its metrics' descriptors exist before its first write (monitoring.tf).
  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

resource "google_cloudfunctions2_function" "issuer" {
  project     = var.project_id
  location    = var.region
  name        = local.functions.issuer
  description = "tokenbroker issuer: scoped, short-lived tokens for IAM-authenticated callers."
  labels      = local.labels

  build_config {
    runtime         = var.runtime
    entry_point     = "issue"
    service_account = var.build_service_account
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["issuer"].name
      }
    }
  }

  service_config {
    available_memory                 = var.issuer.memory
    available_cpu                    = var.issuer.cpu
    timeout_seconds                  = var.issuer.timeout_seconds
    min_instance_count               = var.issuer.min_instances
    max_instance_count               = var.issuer.max_instances
    max_instance_request_concurrency = var.issuer.concurrency
    ingress_settings                 = var.issuer_ingress
    all_traffic_on_latest_revision   = true
    service_account_email            = google_service_account.issuer.email
    environment_variables            = local.issuer_environment

    secret_volumes {
      mount_path = local.policy_mount
      project_id = var.project_id
      secret     = google_secret_manager_secret.issuer_policy.secret_id
      versions {
        # A pinned version: a policy change is a new revision, read by every new instance.
        version = google_secret_manager_secret_version.issuer_policy.version
        path    = local.policy_file
      }
    }
  }

  lifecycle {
    precondition {
      # Public ingress leaves the issuer's whole check to the invoker binding in platform mode;
      # verify mode keeps the issuer's own signature check as a second layer (docs/issuer.md).
      condition     = var.issuer_ingress != "ALLOW_ALL" || var.issuer_caller_identity == "verify"
      error_message = "issuer_ingress = ALLOW_ALL needs issuer_caller_identity = verify."
    }
    precondition {
      condition     = !startswith(google_secret_manager_secret.issuer_policy.secret_id, var.secret_prefix)
      error_message = "The policy secret's id must not start with secret_prefix."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.issuer_policy,
    google_monitoring_metric_descriptor.tokenbroker,
  ]
}

# The key that seals the connect sessions' PKCE verifiers in Firestore (firestore_sessions.py):
# 32 random bytes, base64, made once (two uuid()s hashed: 244 random bits) and never replaced
# by a later apply. It is in the Terraform state (sensitive), like the policy. To rotate, add a
# version (openssl rand -base64 32 | gcloud secrets versions add ...) and re-apply: sessions in
# flight (10 minutes at most) are lost, nothing else.
resource "google_secret_manager_secret" "connect_session_key" {
  count     = var.connect.enabled ? 1 : 0
  project   = var.project_id
  secret_id = "${replace(var.name, "-", "_")}_connect_session_key"
  labels    = local.labels

  replication {
    auto {}
  }

  depends_on = [google_project_service.apis]
}

resource "google_secret_manager_secret_version" "connect_session_key" {
  count       = var.connect.enabled ? 1 : 0
  secret      = google_secret_manager_secret.connect_session_key[0].id
  secret_data = base64sha256("${uuid()}${uuid()}")

  lifecycle {
    ignore_changes = [secret_data]
  }
}

resource "google_cloudfunctions2_function" "connect" {
  #checkov:skip=CKV_GCP_124: platform mode needs ingress ALLOW_ALL for gcloud run services proxy (it reaches the run.app URL from the operator's machine); invocation stays restricted to var.operators by IAM, never allUsers (iap mode defaults to ALLOW_INTERNAL_AND_GCLB)
  count       = var.connect.enabled ? 1 : 0
  project     = var.project_id
  location    = var.region
  name        = local.functions.connect
  description = "tokenbroker connect: operators connect accounts (authorization code + PKCE)."
  labels      = local.labels

  build_config {
    runtime         = var.runtime
    entry_point     = var.connect.entry_point
    service_account = var.build_service_account
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["connect"].name
      }
    }
  }

  service_config {
    available_memory   = var.connect.memory
    timeout_seconds    = var.connect.timeout_seconds
    max_instance_count = var.connect.max_instances
    # Platform mode: the IAM proxy reaches the run.app URL from the operator's machine, so
    # ingress is open and invoker IAM (the operators only) is the gate; iap mode: only the
    # load balancer (https://cloud.google.com/run/docs/securing/ingress#settings).
    ingress_settings               = local.connect_ingress
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.connect[0].email
    environment_variables          = local.connect_environment

    secret_environment_variables {
      key        = "TOKENBROKER_SESSION_KEY"
      project_id = var.project_id
      secret     = google_secret_manager_secret.connect_session_key[0].secret_id
      version    = google_secret_manager_secret_version.connect_session_key[0].version
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.connect_invokers) > 0 && length(local.connect_allowed_operators) > 0
      error_message = "The connect function needs operators (var.operators, or connect.allowed_operators in iap mode)."
    }
    precondition {
      condition     = !startswith(google_secret_manager_secret.connect_session_key[0].secret_id, var.secret_prefix)
      error_message = "The session key secret's id must not start with secret_prefix."
    }
  }

  depends_on = [
    google_project_service.apis,
    google_secret_manager_secret_iam_member.connect_session_key,
  ]
}
