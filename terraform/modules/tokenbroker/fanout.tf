# Fan-out (docs/gcp.md, "Fan-out"; issue 13): with fanout_shards > 1 the scheduled tick refreshes
# nothing itself. The refresher publishes one {"shard": i, "shards": n} message per shard to the
# fan-out topic, and the worker function -- the refresher's own code, entry point `refresh`,
# triggered by that topic through Eventarc -- runs one ordinary tick per message, as many at once
# as fanout_max_instances allows. Leases keep the workers' claims disjoint (claim_due takes only
# unleased connections), so a shard delivered twice refreshes nothing twice. Nothing here is a
# scheduler or a queue of our own: Cloud Scheduler, Pub/Sub, Eventarc and Cloud Functions are.

resource "google_pubsub_topic" "fanout" {
  count = local.fanout_enabled ? 1 : 0

  project      = var.project_id
  name         = local.fanout_topic
  kms_key_name = var.pubsub_kms_key_name
  labels       = local.labels
  # A shard not taken within one refresh interval is overtaken by the next tick's.
  message_retention_duration = "600s"

  depends_on = [google_project_service.apis]
}

resource "google_cloudfunctions2_function" "refresher_worker" {
  count = local.fanout_enabled ? 1 : 0

  project     = var.project_id
  location    = var.region
  name        = local.functions.refresher_worker
  description = "tokenbroker refresher worker: one refresh tick per fan-out shard message."
  labels      = local.labels

  build_config {
    runtime         = var.runtime
    entry_point     = "refresh"
    service_account = var.build_service_account
    source {
      storage_source {
        bucket = google_storage_bucket.sources.name
        object = google_storage_bucket_object.source["refresher"].name
      }
    }
  }

  service_config {
    available_memory = var.refresher.memory
    available_cpu    = var.refresher.cpu
    # Event-driven gen2 functions run at most 540 s.
    timeout_seconds                  = min(var.refresher.timeout_seconds, 540)
    min_instance_count               = 0
    max_instance_count               = var.fanout_max_instances
    max_instance_request_concurrency = 1
    # Eventarc's push subscription is internal traffic.
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    # The refresher's identity: the worker is the refresher, on a share of the due set.
    service_account_email = google_service_account.refresher.email
    environment_variables = local.refresher_worker_environment
  }

  event_trigger {
    trigger_region = var.region
    event_type     = "google.cloud.pubsub.topic.v1.messagePublished"
    pubsub_topic   = google_pubsub_topic.fanout[0].id
    # A tick that fails retryably is redelivered with backoff; a configuration error is logged
    # and acknowledged by the function (entrypoints/refresher.py).
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.refresher.email
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

# The refresher publishes the shards, to the fan-out topic only.
resource "google_pubsub_topic_iam_member" "refresher_fanout_publisher" {
  count = local.fanout_enabled ? 1 : 0

  project = var.project_id
  topic   = google_pubsub_topic.fanout[0].name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${google_service_account.refresher.email}"
}

# The trigger's identity (the refresher's account) invokes the worker's Cloud Run service
# (https://cloud.google.com/eventarc/docs/run/create-trigger-pubsub-gcloud); no one else may.
resource "google_cloud_run_v2_service_iam_member" "refresher_worker_invoker" {
  count = local.fanout_enabled ? 1 : 0

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.refresher_worker[0].name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.refresher.email}"
}
