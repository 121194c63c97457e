# Events (docs/pubsub.md): the topic the refresher publishes to, a dead-letter topic, and an
# example subscription that shows how a subscriber should be set up.

resource "google_pubsub_topic" "events" {
  project                    = var.project_id
  name                       = var.pubsub_topic
  kms_key_name               = var.pubsub_kms_key_name
  labels                     = local.labels
  message_retention_duration = "86400s"

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_topic" "dead_letter" {
  project      = var.project_id
  name         = "${var.pubsub_topic}-dead-letter"
  kms_key_name = var.pubsub_kms_key_name
  labels       = local.labels

  depends_on = [google_project_service.apis]
}

resource "google_pubsub_subscription" "example" {
  count = var.create_example_subscription ? 1 : 0

  project = var.project_id
  name    = "${var.pubsub_topic}-example"
  topic   = google_pubsub_topic.events.id
  labels  = local.labels

  # Messages carry ordering key = connection id: a subscriber sees a connection's events in order.
  enable_message_ordering    = true
  ack_deadline_seconds       = 60
  message_retention_duration = "604800s"

  retry_policy {
    minimum_backoff = "10s"
    maximum_backoff = "600s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = var.max_delivery_attempts
  }

  expiration_policy {
    ttl = "" # never expires
  }
}

# Dead letters are kept where an operator can read them: a topic without a subscription drops
# what it is sent.
resource "google_pubsub_subscription" "dead_letter" {
  count = var.create_example_subscription ? 1 : 0

  project                    = var.project_id
  name                       = "${var.pubsub_topic}-dead-letter"
  topic                      = google_pubsub_topic.dead_letter.id
  labels                     = local.labels
  message_retention_duration = "604800s"
  ack_deadline_seconds       = 60

  expiration_policy {
    ttl = ""
  }
}

# Dead-lettering runs as the Pub/Sub service agent: it must publish to the dead-letter topic and
# acknowledge on the source subscription
# (https://cloud.google.com/pubsub/docs/handling-failures#grant_forwarding_permissions).
locals {
  pubsub_service_agent = "serviceAccount:service-${local.project_number}@gcp-sa-pubsub.iam.gserviceaccount.com"
}

resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  count = var.create_example_subscription ? 1 : 0

  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = local.pubsub_service_agent
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  count = var.create_example_subscription ? 1 : 0

  project      = var.project_id
  subscription = google_pubsub_subscription.example[0].name
  role         = "roles/pubsub.subscriber"
  member       = local.pubsub_service_agent
}
