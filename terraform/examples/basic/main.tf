# An example root: the whole broker in one project. Build the packages first
# (scripts/package writes dist/functions/*.zip), then terraform init && terraform apply.

terraform {
  required_version = ">= 1.5"
  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 6.10, < 7.0"
    }
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}

variable "project_id" {
  description = "Project to deploy into."
  type        = string
}

variable "region" {
  description = "Region of the functions."
  type        = string
  default     = "europe-west1"
}

variable "issuer_callers" {
  description = "Service account emails of the integration workers that call the issuer."
  type        = list(string)
  default     = []
}

variable "alert_email" {
  description = "Where the broker's alerts go (an email notification channel); null: no channel."
  type        = string
  default     = null
}

# The module takes channel names; an email channel is the simplest (docs/operations.md, Alerts).
resource "google_monitoring_notification_channel" "email" {
  count = var.alert_email == null ? 0 : 1

  display_name = "tokenbroker alerts"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }
}

module "tokenbroker" {
  source = "../../modules/tokenbroker"

  project_id           = var.project_id
  region               = var.region
  refresher_source_zip = "${path.root}/../../../dist/functions/refresher.zip"
  issuer_source_zip    = "${path.root}/../../../dist/functions/issuer.zip"
  issuer_policy_toml   = file("${path.root}/policy.toml")
  issuer_callers       = var.issuer_callers

  notification_channels = google_monitoring_notification_channel.email[*].id
}

output "issuer_url" {
  description = "Where workers call the issuer."
  value       = module.tokenbroker.issuer_url
}

output "service_accounts" {
  description = "The functions' service accounts."
  value       = module.tokenbroker.service_accounts
}

output "dashboard" {
  description = "The broker's dashboard in Cloud Monitoring."
  value       = module.tokenbroker.dashboard
}

output "cli_environment" {
  description = "Export these to run the tokenbroker CLI against the deployment."
  value       = module.tokenbroker.cli_environment
}
