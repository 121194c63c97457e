# The refresh tick: Cloud Scheduler calls the refresher over HTTP with an OIDC token of its own
# service account, whose audience is the refresher's URL (Cloud Run's IAM front end checks it).
#
# Scheduler sends Content-Type: application/octet-stream by default when a job has a body
# (https://cloud.google.com/scheduler/docs/reference/rest/v1/projects.locations.jobs#HttpTarget):
# the body here is JSON and says so.

resource "google_cloud_scheduler_job" "refresh" {
  project          = var.project_id
  region           = var.region
  name             = "${var.name}-refresh"
  description      = "tokenbroker refresh tick"
  schedule         = var.refresh_schedule
  time_zone        = var.refresh_time_zone
  attempt_deadline = "${min(var.refresher.timeout_seconds, 1800)}s"

  retry_config {
    # A tick that fails is retried by the next one; one retry covers a cold start's hiccup.
    retry_count          = 1
    min_backoff_duration = "10s"
    max_backoff_duration = "60s"
  }

  http_target {
    http_method = "POST"
    uri         = google_cloudfunctions2_function.refresher.service_config[0].uri
    body        = base64encode(var.refresh_payload)
    headers = {
      "Content-Type" = "application/json"
    }

    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = google_cloudfunctions2_function.refresher.service_config[0].uri
    }
  }

  depends_on = [google_project_service.apis, google_cloud_run_v2_service_iam_member.refresher_invoker]
}
