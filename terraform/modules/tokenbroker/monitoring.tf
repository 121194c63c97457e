# Monitoring: the broker's metric descriptors, the functions' right to write them, seven alert
# policies and a dashboard. The metrics are the catalogue's (shared/tokenbroker/kernel/metrics.py,
# docs/operations.md): custom.googleapis.com/tokenbroker/<name>, written against the monitored
# resource generic_task {project_id, location = TOKENBROKER_REGION = the region,
# namespace = TOKENBROKER_METRICS_NAMESPACE = var.name (main.tf sets both), job = refresher |
# issuer, task_id = one per process}. Counters and distributions are CUMULATIVE from each
# process's start, state is GAUGE (https://cloud.google.com/monitoring/api/v3/kinds-and-types).
# The refresher writes once per tick; its fleet and per-connection gauges are re-read from the
# state store every TOKENBROKER_METRICS_FLEET_INTERVAL_SECONDS (300 s by default) and written
# again, unchanged, at the ticks between.
#
# Every process writes series of its own (task_id), and processes come and go: every condition
# reduces across them (MAX or MIN for a gauge that each refresher reports alike, SUM for
# counters), grouped only by what the incident must name.

locals {
  # tokenbroker.kernel.metrics.PREFIX (tests/deploy check it).
  metric_prefix = "custom.googleapis.com/tokenbroker/"

  # The series of this deployment: its project's generic_task resources whose namespace is the
  # module's name. Neither location nor job is filtered on: a label written otherwise must not
  # make an alert silently blind.
  tokenbroker_series = "resource.type = \"generic_task\" AND resource.label.project_id = \"${var.project_id}\" AND resource.label.namespace = \"${var.name}\""

  # The issuer's requests as Cloud Run counts them: a gen2 function is the Cloud Run service of
  # the same name (https://cloud.google.com/monitoring/api/metrics_gcp#gcp-run).
  issuer_requests = "metric.type = \"run.googleapis.com/request_count\" AND resource.type = \"cloud_run_revision\" AND resource.label.project_id = \"${var.project_id}\" AND resource.label.location = \"${var.region}\" AND resource.label.service_name = \"${local.functions.issuer}\""

  # The catalogue, as Cloud Monitoring descriptors: kind, value type, unit, description and
  # labels (key => description) exactly as tokenbroker.kernel.metrics.CATALOGUE says
  # (tests/deploy/test_terraform_monitoring.py compares them). A descriptor cannot be altered:
  # changing one here replaces it.
  metric_descriptors = {
    "refresh/ticks" = {
      kind        = "CUMULATIVE"
      value_type  = "INT64"
      unit        = "1"
      description = "Refresh ticks run (an absent series means the refresher stopped)."
      labels      = { result = "How the tick ended." }
    }
    "refresh/outcomes" = {
      kind        = "CUMULATIVE"
      value_type  = "INT64"
      unit        = "1"
      description = "Refresh outcomes by class."
      labels      = { outcome = "What the refresh came to." }
    }
    "refresh/quota_limited_ticks" = {
      kind        = "CUMULATIVE"
      value_type  = "INT64"
      unit        = "1"
      description = "Refresh ticks in which the credential store's request quota held refreshes back: the claim was capped at what one quota window carries (more may be due), or claims were given back (quota_deferred)."
      labels      = {}
    }
    "refresh/acquisition_latency" = {
      kind        = "CUMULATIVE"
      value_type  = "DISTRIBUTION"
      unit        = "ms"
      description = "Time from sending a token request to its answer."
      labels = {
        provider = "Provider profile of the connection (profiles.toml names)."
        grant    = "Grant used to acquire the token."
      }
    }
    "connection/consecutive_failures" = {
      kind        = "GAUGE"
      value_type  = "INT64"
      unit        = "1"
      description = "Consecutive failed refreshes of a connection."
      labels      = { connection = "Connection id (at most the connection limit per interval)." }
    }
    "connection/seconds_to_expiry" = {
      kind        = "GAUGE"
      value_type  = "DOUBLE"
      unit        = "s"
      description = "Seconds until a connection's current access token expires."
      labels      = { connection = "Connection id (at most the connection limit per interval)." }
    }
    "fleet/connections" = {
      kind        = "GAUGE"
      value_type  = "INT64"
      unit        = "1"
      description = "Connections by status."
      labels      = { status = "Connection status." }
    }
    "fleet/min_seconds_to_expiry" = {
      kind        = "GAUGE"
      value_type  = "DOUBLE"
      unit        = "s"
      description = "The least seconds to expiry over active connections."
      labels      = {}
    }
    "fleet/outage_budget_seconds" = {
      kind        = "GAUGE"
      value_type  = "DOUBLE"
      unit        = "s"
      description = "How long consumers keep working if the broker stopped now: the earliest expiry among the access tokens consumers can hold (active connections)."
      labels      = {}
    }
    "issuer/decisions" = {
      kind        = "CUMULATIVE"
      value_type  = "INT64"
      unit        = "1"
      description = "Issuer decisions by outcome."
      labels      = { outcome = "The decision." }
    }
    "issuer/latency" = {
      kind        = "CUMULATIVE"
      value_type  = "DISTRIBUTION"
      unit        = "ms"
      description = "Time the issuer took to decide and answer."
      labels      = { outcome = "The decision." }
    }
  }

  # Seconds between ticks: the operator's, or what a plain schedule says ("* * * * *": 60,
  # "*/N * * * *": N minutes, the longest gap of that schedule). 0 means "not known": the
  # refresher_not_run policy's precondition then asks for refresh_interval_seconds.
  refresh_schedule_every = "^\\*/([1-9][0-9]?) \\* \\* \\* \\*$"
  refresh_schedule_seconds = (
    var.refresh_schedule == "* * * * *" ? 60 : (
      can(regex(local.refresh_schedule_every, var.refresh_schedule))
      ? tonumber(regex(local.refresh_schedule_every, var.refresh_schedule)[0]) * 60
      : null
    )
  )
  refresh_interval_seconds = coalesce(var.refresh_interval_seconds, local.refresh_schedule_seconds, 0)

  # The refresher writes its gauges once per tick: a window of two ticks always holds a point.
  gauge_window_seconds = 2 * local.refresh_interval_seconds
  # "Not run for two intervals": a whole number of minutes (the interval is one), at least the
  # 120 s MetricAbsence.duration allows at its least
  # (https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.alertPolicies#metricabsence).
  refresh_absence_seconds = max(120, 2 * local.refresh_interval_seconds)

  # The refresher's settings the thresholds follow, as the broker reads them (else its defaults,
  # Settings.min_lead_seconds and Settings.metrics_fleet_interval_seconds):
  # - the smallest lead: a token is refreshed at the first tick after its remaining life falls
  #   below max(lifetime x overlap fraction, this) (tokenbroker.kernel.schedule), so a healthy
  #   connection's gauge reads at least the lead less one tick;
  # - how long the gauges may lag: the fleet is re-read this often (0: every tick).
  refresher_min_lead_seconds     = tonumber(lookup(var.refresher_environment, "TOKENBROKER_MIN_LEAD_SECONDS", "600"))
  metrics_fleet_interval_seconds = tonumber(lookup(var.refresher_environment, "TOKENBROKER_METRICS_FLEET_INTERVAL_SECONDS", "300"))

  # Per connection: two ticks short of the lead (a refresh due at the lead is a tick late), but
  # never under a quarter of it. With the defaults, 480 s: when it fires, the token has between
  # 480 s less the fleet lag (180 s) and 480 s left.
  alert_seconds_to_expiry = coalesce(
    var.alert_seconds_to_expiry,
    max(local.refresher_min_lead_seconds - 2 * local.refresh_interval_seconds, local.refresher_min_lead_seconds / 4),
  )
  # Fleet-wide: under the lead for longer than a healthy dip can last (a low reading is kept
  # until the next fleet read, then the window's minimum holds it two more ticks): the fleet lag
  # plus three ticks, in whole minutes. 480 s with the defaults.
  alert_outage_budget_seconds    = coalesce(var.alert_outage_budget_seconds, local.refresher_min_lead_seconds)
  outage_budget_duration_seconds = ceil((local.metrics_fleet_interval_seconds + 3 * local.refresh_interval_seconds) / 60) * 60

  # Secret Manager's budget as the refresher spends it: tokenbroker.ports.RequestQuota with the
  # pointer protocol's costs (secret_manager_pointed.py: no read request -- its access has a
  # quota of its own -- and two writes per refresh), at least one and at most MAX_BUDGET_LIMIT
  # (tests/deploy compare).
  # One tick starts at most this many: one minute's worth.
  secret_manager_refreshes_per_minute = max(1, min(floor(var.secret_manager_writes_per_minute / 2), 10000))
  # Held back in every two-tick window for half the smallest lead, in whole minutes, at least
  # two windows (300 s with the defaults): a burst that drains sooner opens nothing.
  quota_limited_duration_seconds = coalesce(
    var.alert_quota_limited_seconds,
    max(2 * local.gauge_window_seconds, floor(local.refresher_min_lead_seconds / 120) * 60),
  )

  # What the incident text tells an operator to run: the CLI with this deployment's settings.
  cli_note = "Run the CLI with this deployment's settings exported (the module's `cli_environment` output: `TOKENBROKER_BACKEND=gcp`, `TOKENBROKER_GCP_PROJECT=${var.project_id}`, ...). docs/operations.md has every alert."

  alert_documentation = {
    consecutive_failures = <<-EOT
      **What it means.** The refresher has failed to refresh connection `$${metric.label.connection}` at least ${var.alert_consecutive_failures} times in a row. Consumers keep using its current access token until it expires; after that they fail.

      **What to do.**
      1. `tokenbroker show $${metric.label.connection}`: the last error, the next attempt and when the current token expires.
      2. `tokenbroker status`: one connection or many? Many failing on one provider points at the provider (an outage, rate limiting, a changed token URL), not at the connection.
      3. A transient error (timeouts, 5xx, 429) is retried with backoff: watch the seconds-to-expiry alert. `tokenbroker refresh $${metric.label.connection}` retries now.
      4. A refusal that needs new credentials moves the connection to needs_reauth (its own alert): re-authorise with `tokenbroker authorize $${metric.label.connection}` (the account holder consents again in a browser), or store new material with `tokenbroker reauth $${metric.label.connection} --client-secret-file FILE` (or `--service-account-key-file`).

      ${local.cli_note}
    EOT

    needs_reauth = <<-EOT
      **What it means.** At least one connection is in needs_reauth: its provider refused its credentials for good (e.g. `invalid_grant`: the refresh token was revoked or expired, the client secret rotated). The refresher no longer refreshes it; its consumers fail once its current access token expires.

      **What to do.**
      1. `tokenbroker status`: the connections whose status is needs_reauth.
      2. `tokenbroker show ID`: the provider's answer and when the current token expires.
      3. Run the command its `tokenbroker show ID` ("next step") and its `connection.needs_reauth` event (`next_step`) name: for a refresh-token connection `tokenbroker authorize ID`, through which the account holder consents again in a browser and the connection is active again at once, with a `connection.recovered` event; for the others, new material with `tokenbroker reauth ID --client-secret-file FILE` (or `--service-account-key-file`).
      4. A connection nobody needs any more: `tokenbroker disable ID` or `tokenbroker remove ID`.

      ${local.cli_note}
    EOT

    seconds_to_expiry = <<-EOT
      **What it means.** Connection `$${metric.label.connection}`'s current access token expires in under ${local.alert_seconds_to_expiry} s (as last read: the gauge may lag by up to ${local.metrics_fleet_interval_seconds} s). The refresher renews a token at the first tick after its remaining life falls below its lead (at least TOKENBROKER_MIN_LEAD_SECONDS, ${local.refresher_min_lead_seconds} s here), so this refresh is overdue, or the connection is held back on purpose (at risk: its last refresh's outcome is unknown, so it is presented again only shortly before expiry; needs re-authorisation: not refreshed at all). Consumers of this connection fail when the token expires.

      **What to do.**
      1. `tokenbroker show $${metric.label.connection}`: the last error and the next attempt.
      2. `tokenbroker refresh $${metric.label.connection}`: refresh now. If it fails with a refusal, re-authorise: `tokenbroker reauth $${metric.label.connection} --refresh-token-file FILE`.
      3. `tokenbroker status`: if many connections are late, the refresher itself is behind (see the "refresher has not run" and outage-budget alerts).
      4. `tokenbroker status` shows it "(at risk)" or needs_reauth: see the needs_reauth alert; an at-risk connection's next presentation settles it.
      5. Tokens that live only a few minutes renew close to expiry by design: for such a fleet lower `alert_seconds_to_expiry`.

      ${local.cli_note}
    EOT

    outage_budget = <<-EOT
      **What it means.** The fleet's outage budget (how long consumers keep working if the broker stopped now: the earliest expiry among the access tokens consumers can hold) has stayed under ${local.alert_outage_budget_seconds} s for ${local.outage_budget_duration_seconds} s. Healthy refreshes keep every token near or above the refresher's lead: refreshes are not keeping up, or a connection that is at risk or needs re-authorisation is running out.

      **What to do.**
      1. `tokenbroker status`: which connections expire first ("expires in") and how many refreshes fail.
      2. Failures on many connections: the provider or the broker's own dependencies (Secret Manager, Firestore) are failing; the refresher's logs name the error: `gcloud functions logs read ${local.functions.refresher} --gen2 --region ${var.region} --project ${var.project_id}`.
      3. No failures but late: the refresher is behind (ticks too far apart, a tick limit too low, too few instances); check the "refresher has not run" alert and the ticks chart on the dashboard.
      4. One connection: `tokenbroker show ID`, then `tokenbroker refresh ID`.

      ${local.cli_note}
    EOT

    refresher_not_run = <<-EOT
      **What it means.** No refresher has reported a tick for ${local.refresh_absence_seconds} s, two refresh intervals: nothing is being refreshed. Consumers keep working until their tokens expire (the outage budget on the dashboard says how long).

      **What to do.**
      1. The schedule: `gcloud scheduler jobs describe ${var.name}-refresh --location ${var.region} --project ${var.project_id}` (paused? its last attempt's status?). `gcloud scheduler jobs run ${var.name}-refresh --location ${var.region} --project ${var.project_id}` runs a tick now.
      2. The function: `gcloud functions logs read ${local.functions.refresher} --gen2 --region ${var.region} --project ${var.project_id}` (crashes, timeouts, permission errors; a metrics write refused is logged too: the refresher's service account needs roles/monitoring.metricWriter).
      3. `tokenbroker status`: how close the connections are to expiry; `tokenbroker refresh` refreshes what is due from the operator's machine meanwhile.

      ${local.cli_note}
    EOT

    secret_manager_quota = <<-EOT
      **What it means.** For ${local.quota_limited_duration_seconds} s, every window of two refresh ticks had a tick that the Secret Manager budget held refreshes back in: more connections were due than the budget carries (${var.secret_manager_writes_per_minute} write and ${var.secret_manager_reads_per_minute} read requests a minute, two writes a refresh: at most ${local.secret_manager_refreshes_per_minute} refreshes a tick, and a tick every ${local.refresh_interval_seconds} s), or other refreshers of this deployment (overlapping ticks, the CLI) had spent it. Nothing fails and nothing is lost: the connections that wait stay due and are refreshed earliest first. But a connection that waits longer than its lead (at least TOKENBROKER_MIN_LEAD_SECONDS, ${local.refresher_min_lead_seconds} s) expires before its turn, and the seconds-to-expiry and outage-budget alerts follow. A burst (many connections added or due at once) drains by itself; a fleet that needs more refreshes a minute than the budget carries falls further behind every minute. (A TOKENBROKER_TICK_LIMIT or payload limit below ${local.secret_manager_refreshes_per_minute} caps the claim the same way and counts here too.)

      **What to do.**
      1. Is it draining? The dashboard's "Ticks the Secret Manager quota held refreshes back in" chart, and `tokenbroker status`: the outage budget and the connections expiring first. The refresher's logs show each tick's `quota_limited` and `quota_deferred`: `gcloud functions logs read ${local.functions.refresher} --gen2 --region ${var.region} --project ${var.project_id}`.
      2. What the fleet needs: about (connections) / (minutes between a token's refreshes, half its lifetime by default) refreshes a minute; 10,000 connections with one-hour tokens need about 333.
      3. Raise the quota: the project's Secret Manager read and write requests per minute are on the Quotas page of the Google Cloud console, and Google raises them on request through Google Cloud Support or your sales representative (https://cloud.google.com/secret-manager/quotas). Then raise the module's `secret_manager_writes_per_minute` and `secret_manager_reads_per_minute` to match: the refresher never spends more than they say, whatever the project's quota.
      4. If those variables were set below the project's quota for other workloads of the project, raise them to what those workloads leave.
      5. Fan out: spread the connections over deployments in projects of their own (each project has its own quota; deployments in one project share it and must split it).
      6. Ticks far apart carry less: each tick starts at most one minute's budget, so a refresh schedule of every N minutes carries 1/N of it; tick every minute.

      ${local.cli_note}
    EOT

    issuer_5xx = <<-EOT
      **What it means.** For 5 minutes, more than a fraction ${var.alert_issuer_5xx_ratio} of the issuer's requests answered 5xx (Cloud Run's request count for ${local.functions.issuer}): callers cannot get tokens. The issuer answers 503 when a dependency (Secret Manager, Firestore, a provider) is unavailable; crashes and timeouts (504) count here too. Requests Cloud Run refuses before an instance sees them (no valid invoker token, every instance busy at `issuer.max_instances`) are not in this count.

      **What to do.**
      1. The issuer's logs: `gcloud functions logs read ${local.functions.issuer} --gen2 --region ${var.region} --project ${var.project_id}`: the decision (unavailable, error) and its cause.
      2. `tokenbroker status`: connections that are expired or in needs_reauth cannot be issued from.
      3. The dashboard's issuer decisions and latency: a burst of one caller, or everyone?
      4. Timeouts under load: more instances (`issuer.max_instances`) or a longer `issuer.timeout_seconds`.

      At very low traffic a single failed request is a large fraction: the ratio needs 5 minutes above the threshold before it opens an incident.

      ${local.cli_note}
    EOT
  }

  # dashboard.json's template variables.
  dashboard_variables = {
    name                 = var.name
    project_id           = var.project_id
    region               = var.region
    issuer_service       = local.functions.issuer
    window               = "${local.gauge_window_seconds}s"
    outage_budget_alert  = local.alert_outage_budget_seconds
    seconds_expiry_alert = local.alert_seconds_to_expiry
    issuer_5xx_ratio     = var.alert_issuer_5xx_ratio
  }
}

# The descriptors exist before the functions write and before a policy names them: Cloud
# Monitoring refuses an alert policy on a custom metric it does not know ("Cannot find metric(s)
# that match type"), and a descriptor auto-created by a first write has only the labels that
# write happened to carry. Metric types are per project, shared by every deployment in it
# (namespace tells them apart): a second deployment in the project sets
# create_metric_descriptors = false. Deleting a descriptor deletes its data.
resource "google_monitoring_metric_descriptor" "tokenbroker" {
  for_each = var.create_metric_descriptors ? local.metric_descriptors : {}

  project      = var.project_id
  type         = "${local.metric_prefix}${each.key}"
  display_name = "tokenbroker ${each.key}"
  description  = each.value.description
  metric_kind  = each.value.kind
  value_type   = each.value.value_type
  unit         = each.value.unit

  dynamic "labels" {
    for_each = each.value.labels
    content {
      key         = labels.key
      value_type  = "STRING"
      description = labels.value
    }
  }

  depends_on = [google_project_service.apis]
}

# Writing time series: roles/monitoring.metricWriter (timeSeries.create and the descriptors'
# create/get/list, nothing that reads data) is the narrowest predefined role, and Cloud
# Monitoring has no grant below the project for it. The scheduler's account writes nothing.
resource "google_project_iam_member" "refresher_metric_writer" {
  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = "serviceAccount:${google_service_account.refresher.email}"
}

resource "google_project_iam_member" "issuer_metric_writer" {
  project = var.project_id
  role    = "roles/monitoring.metricWriter"
  member  = "serviceAccount:${google_service_account.issuer.email}"
}

# --- alert policies ----------------------------------------------------------------------------
# Only COMPARISON_GT and COMPARISON_LT are supported by metric thresholds
# (https://cloud.google.com/monitoring/api/ref_v3/rest/v3/projects.alertPolicies#metricthreshold):
# "at least N" on an integer gauge is "more than N - 1". Durations are whole minutes. A gauge
# whose series stops (a connection removed, fixed and no longer among the written ones) leaves
# the condition inactive (EVALUATION_MISSING_DATA_INACTIVE): its incident closes.

resource "google_monitoring_alert_policy" "consecutive_failures" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): a connection keeps failing to refresh"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "consecutive-failures" })

  conditions {
    display_name = "connection/consecutive_failures >= ${var.alert_consecutive_failures}, per connection"
    condition_threshold {
      filter                  = "metric.type = \"${local.metric_prefix}connection/consecutive_failures\" AND ${local.tokenbroker_series}"
      comparison              = "COMPARISON_GT"
      threshold_value         = var.alert_consecutive_failures - 1
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "${local.gauge_window_seconds}s"
        per_series_aligner   = "ALIGN_MAX"
        cross_series_reducer = "REDUCE_MAX"
        group_by_fields      = ["metric.label.connection"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): refreshes of $${metric.label.connection} keep failing"
    content   = local.alert_documentation.consecutive_failures
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

resource "google_monitoring_alert_policy" "needs_reauth" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): a connection needs re-authorisation"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "needs-reauth" })

  conditions {
    display_name = "fleet/connections{status=needs_reauth} > 0"
    condition_threshold {
      filter                  = "metric.type = \"${local.metric_prefix}fleet/connections\" AND metric.label.status = \"needs_reauth\" AND ${local.tokenbroker_series}"
      comparison              = "COMPARISON_GT"
      threshold_value         = 0
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "${local.gauge_window_seconds}s"
        per_series_aligner   = "ALIGN_MAX"
        cross_series_reducer = "REDUCE_MAX"
        group_by_fields      = ["resource.label.namespace"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): a connection needs re-authorisation"
    content   = local.alert_documentation.needs_reauth
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

resource "google_monitoring_alert_policy" "seconds_to_expiry" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): a connection's token is about to expire"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "seconds-to-expiry" })

  conditions {
    display_name = "connection/seconds_to_expiry < ${local.alert_seconds_to_expiry}, per connection"
    condition_threshold {
      filter                  = "metric.type = \"${local.metric_prefix}connection/seconds_to_expiry\" AND ${local.tokenbroker_series}"
      comparison              = "COMPARISON_LT"
      threshold_value         = local.alert_seconds_to_expiry
      duration                = "0s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "${local.gauge_window_seconds}s"
        per_series_aligner   = "ALIGN_MIN"
        cross_series_reducer = "REDUCE_MIN"
        group_by_fields      = ["metric.label.connection"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): the token of $${metric.label.connection} is about to expire"
    content   = local.alert_documentation.seconds_to_expiry
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

resource "google_monitoring_alert_policy" "outage_budget" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): the outage budget is low"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "outage-budget" })

  conditions {
    display_name = "fleet/outage_budget_seconds < ${local.alert_outage_budget_seconds} for ${local.outage_budget_duration_seconds}s"
    condition_threshold {
      filter                  = "metric.type = \"${local.metric_prefix}fleet/outage_budget_seconds\" AND ${local.tokenbroker_series}"
      comparison              = "COMPARISON_LT"
      threshold_value         = local.alert_outage_budget_seconds
      duration                = "${local.outage_budget_duration_seconds}s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "${local.gauge_window_seconds}s"
        per_series_aligner   = "ALIGN_MIN"
        cross_series_reducer = "REDUCE_MIN"
        group_by_fields      = ["resource.label.namespace"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): the outage budget is low"
    content   = local.alert_documentation.outage_budget
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

# Absence of refresh/ticks summed over every refresher process of the deployment: one instance
# scaling away ends its series and must not count, all of them falling silent must. A
# deployment whose refresher never wrote a tick has no series to miss (the Scheduler job's own
# errors show that case).
resource "google_monitoring_alert_policy" "refresher_not_run" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): the refresher has not run"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "refresher-not-run" })

  conditions {
    display_name = "no refresh/ticks for ${local.refresh_absence_seconds}s (two intervals)"
    condition_absent {
      filter   = "metric.type = \"${local.metric_prefix}refresh/ticks\" AND ${local.tokenbroker_series}"
      duration = "${local.refresh_absence_seconds}s"
      aggregations {
        alignment_period     = "${local.refresh_interval_seconds}s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.namespace"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): the refresher has not run for ${local.refresh_absence_seconds}s"
    content   = local.alert_documentation.refresher_not_run
  }

  alert_strategy {
    auto_close = "86400s"
  }

  lifecycle {
    precondition {
      condition     = local.refresh_interval_seconds > 0
      error_message = "refresh_interval_seconds: refresh_schedule is neither \"* * * * *\" nor \"*/N * * * *\"; set the seconds between its ticks."
    }
    precondition {
      condition     = local.refresh_schedule_seconds == null || local.refresh_interval_seconds == local.refresh_schedule_seconds
      error_message = "refresh_interval_seconds disagrees with refresh_schedule; leave it null to derive it from the schedule."
    }
    precondition {
      condition     = local.refresh_interval_seconds < local.refresher_min_lead_seconds
      error_message = "refresh_schedule: ticks at least TOKENBROKER_MIN_LEAD_SECONDS apart (the refresher's smallest lead) let tokens expire between two ticks; tick more often."
    }
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

# Sustained quota pressure: refresh/quota_limited_ticks (one per tick the Secret Manager budget
# held refreshes back in, a zero for every other tick) summed over every refresher process, per
# window of two ticks, above zero in every window for the duration. Nothing is lost while it
# holds (the connections wait, due, earliest first), hence WARNING: the expiry alerts follow if
# the wait outlasts the lead. A burst that drains within the duration opens nothing.
resource "google_monitoring_alert_policy" "secret_manager_quota" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): the Secret Manager quota holds refreshes back"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "refresher", alert = "secret-manager-quota" })

  conditions {
    display_name = "refresh/quota_limited_ticks > 0 in every ${local.gauge_window_seconds}s window for ${local.quota_limited_duration_seconds}s"
    condition_threshold {
      filter                  = "metric.type = \"${local.metric_prefix}refresh/quota_limited_ticks\" AND ${local.tokenbroker_series}"
      comparison              = "COMPARISON_GT"
      threshold_value         = 0
      duration                = "${local.quota_limited_duration_seconds}s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "${local.gauge_window_seconds}s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.namespace"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): the Secret Manager quota holds refreshes back"
    content   = local.alert_documentation.secret_manager_quota
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}

# A ratio of two filters (MetricThreshold.denominator_filter): the same condition type as the
# others, so the same checks cover it, and no query language. Numerator and denominator use the
# same alignment and grouping, as the API requires ("the same periodicity and labels"). No 5xx
# in a window means no numerator series and no incident, which is right.
resource "google_monitoring_alert_policy" "issuer_5xx" {
  count = var.monitoring ? 1 : 0

  project               = var.project_id
  display_name          = "tokenbroker (${var.name}): the issuer answers 5xx"
  combiner              = "OR"
  severity              = "CRITICAL"
  notification_channels = var.notification_channels
  user_labels           = merge(local.labels, { component = "issuer", alert = "issuer-5xx" })

  conditions {
    display_name = "run.googleapis.com/request_count 5xx / all > ${var.alert_issuer_5xx_ratio} over 5 min"
    condition_threshold {
      filter                  = "${local.issuer_requests} AND metric.label.response_code_class = \"5xx\""
      denominator_filter      = local.issuer_requests
      comparison              = "COMPARISON_GT"
      threshold_value         = var.alert_issuer_5xx_ratio
      duration                = "300s"
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
      }
      denominator_aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "tokenbroker (${var.name}): the issuer answers 5xx"
    content   = local.alert_documentation.issuer_5xx
  }

  alert_strategy {
    auto_close = "1800s"
  }

  depends_on = [google_project_service.apis]
}

# --- the dashboard ----------------------------------------------------------------------------

resource "google_monitoring_dashboard" "fleet" {
  count = var.monitoring ? 1 : 0

  project        = var.project_id
  dashboard_json = templatefile("${path.module}/dashboard.json", local.dashboard_variables)

  depends_on = [google_project_service.apis, google_monitoring_metric_descriptor.tokenbroker]
}
