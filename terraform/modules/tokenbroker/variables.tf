# Every input of the module. terraform/README.md's table is generated from this file
# (tests/deploy/readme_table.py); a test fails when the two differ.

variable "project_id" {
  description = "Project that holds the functions, secrets, database and topics."
  type        = string
}

variable "region" {
  description = "Region of the functions, the scheduler job and the source bucket."
  type        = string
}

variable "name" {
  description = "Prefix of every resource the module names (functions, service accounts, bucket, topics)."
  type        = string
  default     = "tokenbroker"
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,17}[a-z0-9]$", var.name))
    error_message = "name: 3-19 lower-case letters, digits and hyphens (service account ids are at most 30 characters)."
  }
}

variable "enable_apis" {
  description = "Enable the Google APIs the broker uses (google_project_service; never disabled on destroy)."
  type        = bool
  default     = true
}

variable "labels" {
  description = "Labels put on every resource that takes labels."
  type        = map(string)
  default     = {}
}

# --- the function sources (scripts/package writes dist/functions/<name>.zip) ---------------

variable "refresher_source_zip" {
  description = "Path of the refresher's package zip (scripts/package: dist/functions/refresher.zip)."
  type        = string
}

variable "issuer_source_zip" {
  description = "Path of the issuer's package zip (scripts/package: dist/functions/issuer.zip)."
  type        = string
}

variable "build_service_account" {
  description = "Service account (projects/P/serviceAccounts/EMAIL) Cloud Build uses to build the functions; null: the project's default build account."
  type        = string
  default     = null
}

# --- runtime sizing ------------------------------------------------------------------------

variable "runtime" {
  description = "Cloud Functions runtime of every function."
  type        = string
  default     = "python312"
}

variable "refresher" {
  description = "Refresher sizing. One tick at a time per instance (concurrency 1): ticks are leased, a second instance only splits the due set."
  type = object({
    memory          = optional(string, "512Mi")
    cpu             = optional(string, "1")
    timeout_seconds = optional(number, 540)
    min_instances   = optional(number, 0)
    max_instances   = optional(number, 3)
    concurrency     = optional(number, 1)
  })
  default = {}
}

variable "fanout_shards" {
  description = "Fan-out (docs/gcp.md, Fan-out): worker ticks per scheduled tick. 1 (default): off, the refresher refreshes. Above 1: the refresher publishes this many shard messages to the NAME-fanout topic and the NAME-refresher-worker function runs one tick per shard, each claiming at most the refresher's TOKENBROKER_TICK_LIMIT of its shard's due connections (shards partition the connections by a hash of the id; leases keep redeliveries apart)."
  type        = number
  default     = 1
  validation {
    condition     = var.fanout_shards >= 1 && var.fanout_shards <= 1000 && floor(var.fanout_shards) == var.fanout_shards
    error_message = "fanout_shards: a whole number from 1 (off) to 1000."
  }
}

variable "fanout_max_instances" {
  description = "Fan-out: the most worker instances Cloud Functions runs at once (max_instance_count of NAME-refresher-worker; one tick per instance). Shards beyond it wait for a free instance."
  type        = number
  default     = 4
  validation {
    condition     = var.fanout_max_instances >= 1 && floor(var.fanout_max_instances) == var.fanout_max_instances
    error_message = "fanout_max_instances: a whole number, at least 1."
  }
}

variable "issuer" {
  description = "Issuer sizing. The ASGI server serves many requests per instance; one instance keeps its token cache warm (min_instances = 1)."
  type = object({
    memory          = optional(string, "512Mi")
    cpu             = optional(string, "1")
    timeout_seconds = optional(number, 60)
    min_instances   = optional(number, 1)
    max_instances   = optional(number, 10)
    concurrency     = optional(number, 80)
  })
  default = {}
}

variable "connect" {
  description = "The connect function: operators connect accounts (the authorization-code flow) through its pages (README, Connecting an account). Off by default. identity: platform (Cloud Run IAM; operators open it through gcloud run services proxy) or iap (behind Identity-Aware Proxy). public_url: the URL operators' browsers use (the proxy's http://localhost:PORT, or IAP's HTTPS address); the redirect URI to register with each provider is public_url + /callback. allowed_operators: who may connect accounts (emails, user:/serviceAccount: members or domain:NAME); default: the user, serviceAccount and domain members of var.operators. ingress: default ALLOW_ALL in platform mode (the proxy reaches the run.app URL from outside; invoker IAM still applies) and ALLOW_INTERNAL_AND_GCLB in iap mode."
  type = object({
    enabled           = optional(bool, false)
    source_zip        = optional(string)
    entry_point       = optional(string, "connect_http")
    memory            = optional(string, "256Mi")
    timeout_seconds   = optional(number, 60)
    max_instances     = optional(number, 2)
    identity          = optional(string, "platform")
    public_url        = optional(string, "http://localhost:8080")
    iap_audience      = optional(string)
    allowed_operators = optional(list(string))
    ingress           = optional(string)
  })
  default = {}
  validation {
    condition     = !var.connect.enabled || var.connect.source_zip != null
    error_message = "connect.source_zip is required when connect.enabled is true."
  }
  validation {
    condition     = contains(["platform", "iap"], var.connect.identity)
    error_message = "connect.identity must be platform or iap."
  }
  validation {
    condition     = var.connect.identity != "iap" || var.connect.iap_audience != null
    error_message = "connect.iap_audience is required in iap mode (/projects/NUMBER/global/backendServices/ID, or /projects/NUMBER/locations/REGION/services/NAME)."
  }
  validation {
    condition     = can(regex("^(https://[^/\\s]+|http://(localhost|127\\.0\\.0\\.1)(:[0-9]+)?)$", var.connect.public_url))
    error_message = "connect.public_url: an https origin, or http://localhost:PORT for the IAM proxy (no path, no trailing slash)."
  }
  validation {
    condition     = var.connect.ingress == null || contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], coalesce(var.connect.ingress, "ALLOW_ALL"))
    error_message = "connect.ingress must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

variable "operators" {
  description = "IAM members who may open the connect pages (roles/run.invoker on the connect function in platform mode): user:EMAIL, group:EMAIL, domain:NAME or serviceAccount:EMAIL. Never public."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for m in var.operators : can(regex("^(user|group|domain|serviceAccount):[^\\s:]+$", m))])
    error_message = "operators: user:, group:, domain: or serviceAccount: members only (no allUsers or allAuthenticatedUsers)."
  }
}

variable "log_level" {
  description = "TOKENBROKER_LOG_LEVEL of every function."
  type        = string
  default     = "info"
}

variable "refresher_environment" {
  description = "Extra TOKENBROKER_* settings of the refresher (README, Configuration), e.g. TOKENBROKER_TICK_LIMIT. The module's own settings win; the Secret Manager budget has variables of its own (secret_manager_reads_per_minute, secret_manager_writes_per_minute) and is refused here."
  type        = map(string)
  default     = {}
  validation {
    condition     = length(setintersection(keys(var.refresher_environment), ["TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE", "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE"])) == 0
    error_message = "refresher_environment: set the Secret Manager budget with secret_manager_reads_per_minute and secret_manager_writes_per_minute, not TOKENBROKER_SECRET_MANAGER_*_PER_MINUTE (the module sets those itself, for the refresher and the CLI alike)."
  }
  validation {
    condition     = length(setintersection(keys(var.refresher_environment), ["TOKENBROKER_FANOUT_SHARDS", "TOKENBROKER_FANOUT_TOPIC"])) == 0
    error_message = "refresher_environment: set fan-out with fanout_shards, not TOKENBROKER_FANOUT_* (the module sets those itself, and keeps them off the worker)."
  }
}

variable "issuer_environment" {
  description = "Extra TOKENBROKER_* settings of the issuer."
  type        = map(string)
  default     = {}
}

# --- state, secrets, events ----------------------------------------------------------------

variable "secret_prefix" {
  description = "TOKENBROKER_SECRET_PREFIX: every connection's secret id starts with it; the functions' secret permissions are conditioned on it."
  type        = string
  default     = "tokenbroker-"
  validation {
    condition     = can(regex("^[A-Za-z0-9_-]{3,200}$", var.secret_prefix))
    error_message = "secret_prefix: 3-200 characters of letters, digits, '-' and '_' (a non-empty prefix keeps the grants scoped)."
  }
}

# Secret Manager's request quotas per minute per project (https://cloud.google.com/secret-manager/quotas):
# the refresher never starts a refresh whose requests would exceed them (docs/gcp.md).

variable "secret_manager_reads_per_minute" {
  description = "TOKENBROKER_SECRET_MANAGER_READS_PER_MINUTE: Secret Manager read requests (GetSecret, ListSecretVersions; not AccessSecretVersion, which has a quota of its own) per minute the refreshers of this deployment, and its CLI, may spend together. The project's quota (600 by default, https://cloud.google.com/secret-manager/quotas) less what other workloads of the project use; deployments in one project share its quota but not their budgets, so split it between them. Raise it when the project's quota is raised."
  type        = number
  default     = 600
  validation {
    condition     = var.secret_manager_reads_per_minute >= 1 && var.secret_manager_reads_per_minute <= 100000 && floor(var.secret_manager_reads_per_minute) == var.secret_manager_reads_per_minute
    error_message = "secret_manager_reads_per_minute: a whole number of requests per minute, 1 to 100000."
  }
}

variable "secret_manager_writes_per_minute" {
  description = "TOKENBROKER_SECRET_MANAGER_WRITES_PER_MINUTE: Secret Manager write requests (AddSecretVersion, DestroySecretVersion, ...) per minute the refreshers of this deployment, and its CLI, may spend together; a refresh costs two, so the default carries 300 refreshes a minute. The project's quota (600 by default, https://cloud.google.com/secret-manager/quotas) less what other workloads of the project use; deployments in one project share its quota but not their budgets, so split it between them. Raise it when the project's quota is raised."
  type        = number
  default     = 600
  validation {
    condition     = var.secret_manager_writes_per_minute >= 1 && var.secret_manager_writes_per_minute <= 100000 && floor(var.secret_manager_writes_per_minute) == var.secret_manager_writes_per_minute
    error_message = "secret_manager_writes_per_minute: a whole number of requests per minute, 1 to 100000."
  }
}

variable "create_firestore_database" {
  description = "Create the Firestore (Native mode) database; false: it exists already."
  type        = bool
  default     = true
}

variable "firestore_database" {
  description = "TOKENBROKER_FIRESTORE_DATABASE. A database of its own (the default) makes the functions' Firestore grants (conditioned on the database) cover nothing else."
  type        = string
  default     = "tokenbroker"
}

variable "firestore_location" {
  description = "Location of the Firestore database (e.g. eur3, nam5, europe-west1)."
  type        = string
  default     = "eur3"
}

variable "firestore_collection" {
  description = "TOKENBROKER_FIRESTORE_COLLECTION (and prefix of its sibling collections)."
  type        = string
  default     = "tokenbroker_connections"
}

variable "firestore_delete_protection" {
  description = "Refuse to delete the database (DELETE_PROTECTION_ENABLED); turn off before tearing down."
  type        = bool
  default     = true
}

variable "pubsub_topic" {
  description = "TOKENBROKER_PUBSUB_TOPIC: the events topic id."
  type        = string
  default     = "tokenbroker-events"
}

variable "pubsub_kms_key_name" {
  description = "Cloud KMS key for the topics (CMEK); null: Google-managed encryption."
  type        = string
  default     = null
}

variable "create_example_subscription" {
  description = "Create an example pull subscription on the events topic with a dead-letter policy (and a subscription holding dead letters)."
  type        = bool
  default     = true
}

variable "max_delivery_attempts" {
  description = "Deliveries of one message to the example subscription before it goes to the dead-letter topic (5-100)."
  type        = number
  default     = 10
  validation {
    condition     = var.max_delivery_attempts >= 5 && var.max_delivery_attempts <= 100
    error_message = "max_delivery_attempts: 5 to 100 (Pub/Sub's range)."
  }
}

# --- the issuer's callers and identity -----------------------------------------------------

variable "issuer_callers" {
  description = "Service account emails that may invoke the issuer (roles/run.invoker on its Cloud Run service, one binding each). The policy decides what each may get."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.issuer_callers : can(regex("^[^@:\\s]+@[^@:\\s]+\\.iam\\.gserviceaccount\\.com$", c))])
    error_message = "issuer_callers: service account emails only (no allUsers, allAuthenticatedUsers, users or groups)."
  }
}

variable "issuer_impersonated_service_accounts" {
  description = "Service account emails the issuer may mint access tokens for (service-account connections): roles/iam.serviceAccountTokenCreator on each, nothing project-wide."
  type        = list(string)
  default     = []
}

variable "issuer_caller_identity" {
  description = "TOKENBROKER_CALLER_IDENTITY: platform (Cloud Run's IAM front end verifies callers' ID tokens; invoker IAM required) or verify (the issuer verifies them too)."
  type        = string
  default     = "platform"
  validation {
    condition     = contains(["platform", "verify"], var.issuer_caller_identity)
    error_message = "issuer_caller_identity: platform or verify."
  }
}

variable "issuer_ingress" {
  description = "Ingress of the issuer: ALLOW_INTERNAL_ONLY (callers reach it through a VPC in the project or its VPC-SC perimeter), ALLOW_INTERNAL_AND_GCLB, or ALLOW_ALL (only with issuer_caller_identity = verify)."
  type        = string
  default     = "ALLOW_INTERNAL_ONLY"
  validation {
    condition     = contains(["ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB", "ALLOW_ALL"], var.issuer_ingress)
    error_message = "issuer_ingress: ALLOW_INTERNAL_ONLY, ALLOW_INTERNAL_AND_GCLB or ALLOW_ALL."
  }
}

variable "issuer_extra_audiences" {
  description = "More audiences callers' ID tokens may carry (e.g. the function's https://NAME-HASH-REGION.a.run.app URL, known after the first apply, or a custom domain)."
  type        = list(string)
  default     = []
}

variable "issuer_policy_toml" {
  description = "The issuer's policy (docs/policy.md), TOML. Stored as a Secret Manager secret and mounted as the file TOKENBROKER_POLICY_FILE names."
  type        = string
}

# --- the refresh schedule ------------------------------------------------------------------

variable "refresh_schedule" {
  description = "Cloud Scheduler cron of the refresh tick."
  type        = string
  default     = "* * * * *"
}

variable "refresh_time_zone" {
  description = "Time zone of refresh_schedule."
  type        = string
  default     = "Etc/UTC"
}

variable "refresh_payload" {
  description = "JSON body of each tick (sent as application/json): {} runs a full tick; {\"limit\": 500} narrows it."
  type        = string
  default     = "{}"
  validation {
    condition     = can(jsondecode(var.refresh_payload))
    error_message = "refresh_payload must be JSON."
  }
}

variable "refresh_interval_seconds" {
  description = "Seconds between refresh ticks, for the monitoring windows (the \"refresher has not run\" alert waits two of them). null: derived from refresh_schedule when it is \"* * * * *\" or \"*/N * * * *\"; set it for any other schedule (a whole number of minutes, 60-3600, under the refresher's smallest lead)."
  type        = number
  default     = null
  validation {
    condition     = var.refresh_interval_seconds == null || try(var.refresh_interval_seconds >= 60 && var.refresh_interval_seconds <= 3600 && var.refresh_interval_seconds % 60 == 0, false)
    error_message = "refresh_interval_seconds: a whole number of minutes from 60 to 3600 (Cloud Scheduler's cron counts minutes; alert durations are whole minutes)."
  }
}

# --- monitoring (monitoring.tf, docs/operations.md) ---------------------------------------

variable "monitoring" {
  description = "Create the alert policies and the dashboard. The metric descriptors and the functions' roles/monitoring.metricWriter stay either way: the functions write their metrics regardless."
  type        = bool
  default     = true
}

variable "create_metric_descriptors" {
  description = "Create the broker's metric descriptors (custom.googleapis.com/tokenbroker/*). Metric types belong to the project, shared by every deployment in it: a second deployment in the same project sets false. Destroying them deletes their data."
  type        = bool
  default     = true
}

variable "notification_channels" {
  description = "Notification channels every alert policy notifies, as projects/PROJECT/notificationChannels/ID (e.g. google_monitoring_notification_channel.x.id). Empty: incidents open in the console only."
  type        = list(string)
  default     = []
  validation {
    condition     = alltrue([for c in var.notification_channels : can(regex("^projects/[^/]+/notificationChannels/[^/]+$", c))])
    error_message = "notification_channels: full channel names, projects/PROJECT/notificationChannels/ID."
  }
}

variable "alert_consecutive_failures" {
  description = "Alert when a connection's refresh has failed this many times in a row (connection/consecutive_failures)."
  type        = number
  default     = 3
  validation {
    condition     = var.alert_consecutive_failures >= 1 && floor(var.alert_consecutive_failures) == var.alert_consecutive_failures
    error_message = "alert_consecutive_failures: a whole number, at least 1."
  }
}

variable "alert_seconds_to_expiry" {
  description = "Alert when a connection's access token expires in fewer seconds than this (connection/seconds_to_expiry). null: the refresher's smallest lead (TOKENBROKER_MIN_LEAD_SECONDS in refresher_environment, else the broker's 600 s) less two refresh intervals, at least a quarter of the lead: 480 s with the defaults, a refresh a tick overdue."
  type        = number
  default     = null
  validation {
    condition     = var.alert_seconds_to_expiry == null || try(var.alert_seconds_to_expiry > 0, false)
    error_message = "alert_seconds_to_expiry: a positive number of seconds (or null)."
  }
}

variable "alert_outage_budget_seconds" {
  description = "Alert when the fleet's outage budget (fleet/outage_budget_seconds: how long consumers keep working if the broker stopped now) stays below this longer than a healthy dip lasts (the fleet gauges' read interval plus three ticks). null: the refresher's smallest lead (TOKENBROKER_MIN_LEAD_SECONDS, else 600 s)."
  type        = number
  default     = null
  validation {
    condition     = var.alert_outage_budget_seconds == null || try(var.alert_outage_budget_seconds > 0, false)
    error_message = "alert_outage_budget_seconds: a positive number of seconds (or null)."
  }
}

variable "alert_quota_limited_seconds" {
  description = "Alert when the Secret Manager budget (secret_manager_*_per_minute) has held refreshes back in every window of two refresh ticks for this long (refresh/quota_limited_ticks): more connections are due than it carries. null: half the refresher's smallest lead (TOKENBROKER_MIN_LEAD_SECONDS, else 600 s) in whole minutes, at least two such windows: 300 s with the defaults."
  type        = number
  default     = null
  validation {
    condition     = var.alert_quota_limited_seconds == null || try(var.alert_quota_limited_seconds >= 60 && var.alert_quota_limited_seconds <= 86400 && var.alert_quota_limited_seconds % 60 == 0, false)
    error_message = "alert_quota_limited_seconds: a whole number of minutes from 60 to 86400 seconds (alert durations are whole minutes), or null."
  }
}

variable "alert_issuer_5xx_ratio" {
  description = "Alert when more than this fraction of the issuer's requests answer 5xx over 5 minutes (Cloud Run's run.googleapis.com/request_count)."
  type        = number
  default     = 0.05
  validation {
    condition     = var.alert_issuer_5xx_ratio > 0 && var.alert_issuer_5xx_ratio < 1
    error_message = "alert_issuer_5xx_ratio: a fraction between 0 and 1 (0.05 is 5%)."
  }
}
