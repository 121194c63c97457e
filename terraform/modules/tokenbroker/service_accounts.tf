# One service account per function, and one for the scheduler: each holds only its own grants
# (iam.tf), so a compromised function cannot act as another.

resource "google_service_account" "refresher" {
  project      = var.project_id
  account_id   = "${var.name}-refresher"
  display_name = "tokenbroker refresher (${var.name})"
  description  = "Runs the refresh tick: the broker's secrets, its Firestore database, its events topic."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "issuer" {
  project      = var.project_id
  account_id   = "${var.name}-issuer"
  display_name = "tokenbroker issuer (${var.name})"
  description  = "Hands out scoped tokens: reads the broker's secrets and state."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.name}-scheduler"
  display_name = "tokenbroker scheduler (${var.name})"
  description  = "Cloud Scheduler's OIDC identity: may invoke the refresher, nothing else."

  depends_on = [google_project_service.apis]
}

resource "google_service_account" "connect" {
  count        = var.connect.enabled ? 1 : 0
  project      = var.project_id
  account_id   = "${var.name}-connect"
  display_name = "tokenbroker connect pages (${var.name})"
  description  = "Connects accounts: the broker's secrets, its Firestore database, its events topic, the session key."

  depends_on = [google_project_service.apis]
}
