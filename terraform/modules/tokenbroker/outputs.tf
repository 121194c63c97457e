output "refresher_url" {
  description = "The refresher's Cloud Run URL (the scheduler job's target and OIDC audience)."
  value       = google_cloudfunctions2_function.refresher.service_config[0].uri
}

output "issuer_url" {
  description = "The issuer's Cloud Run URL: what callers send requests (and ID-token audiences) to."
  value       = google_cloudfunctions2_function.issuer.service_config[0].uri
}

output "issuer_function_url" {
  description = "The issuer's cloudfunctions.net URL (also an accepted audience)."
  value       = google_cloudfunctions2_function.issuer.url
}

output "issuer_audiences" {
  description = "Every audience the issuer accepts (TOKENBROKER_ISSUER_AUDIENCE)."
  value       = local.issuer_audiences
}

output "connect_url" {
  description = "The connect function's Cloud Run URL (what gcloud run services proxy or IAP's backend reaches); null when connect is off."
  value       = var.connect.enabled ? google_cloudfunctions2_function.connect[0].service_config[0].uri : null
}

output "connect_redirect_uri" {
  description = "The redirect URI to register with each provider's OAuth client for the connect pages (connect.public_url + /callback); null when connect is off."
  value       = var.connect.enabled ? "${var.connect.public_url}/callback" : null
}

output "service_accounts" {
  description = "Email of each function's service account, and the scheduler's."
  value = {
    refresher = google_service_account.refresher.email
    issuer    = google_service_account.issuer.email
    scheduler = google_service_account.scheduler.email
    connect   = var.connect.enabled ? google_service_account.connect[0].email : null
  }
}

output "events_topic" {
  description = "The events topic (TOKENBROKER_PUBSUB_TOPIC) as a full resource id."
  value       = google_pubsub_topic.events.id
}

output "dead_letter_topic" {
  description = "The dead-letter topic of the example subscription."
  value       = google_pubsub_topic.dead_letter.id
}

output "firestore_database" {
  description = "The Firestore database (TOKENBROKER_FIRESTORE_DATABASE)."
  value       = local.database
}

output "secret_prefix" {
  description = "The connections' secret id prefix (TOKENBROKER_SECRET_PREFIX): the CLI must use the same."
  value       = var.secret_prefix
}

output "cli_environment" {
  description = "Environment for the tokenbroker CLI run by an operator against this deployment (the refresher's Secret Manager budget included: the CLI's refreshes spend it too)."
  value       = local.cli_environment
}

output "alert_policies" {
  description = "Each alert policy's name (projects/PROJECT/alertPolicies/ID) by alert (docs/operations.md, Alerts); empty when monitoring is false."
  value = var.monitoring ? {
    consecutive_failures = google_monitoring_alert_policy.consecutive_failures[0].name
    needs_reauth         = google_monitoring_alert_policy.needs_reauth[0].name
    seconds_to_expiry    = google_monitoring_alert_policy.seconds_to_expiry[0].name
    outage_budget        = google_monitoring_alert_policy.outage_budget[0].name
    refresher_not_run    = google_monitoring_alert_policy.refresher_not_run[0].name
    issuer_5xx           = google_monitoring_alert_policy.issuer_5xx[0].name
    secret_manager_quota = google_monitoring_alert_policy.secret_manager_quota[0].name
  } : {}
}

output "dashboard" {
  description = "The fleet dashboard (projects/PROJECT_NUMBER/dashboards/ID); null when monitoring is false."
  value       = var.monitoring ? google_monitoring_dashboard.fleet[0].id : null
}
