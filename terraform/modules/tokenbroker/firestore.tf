# State: one Firestore (Native mode) database, the index of the due-selection query and the TTL
# of the budgets (shared/tokenbroker/adapters/gcp/firestore.py).

resource "google_firestore_database" "state" {
  count = var.create_firestore_database ? 1 : 0

  project     = var.project_id
  name        = var.firestore_database
  location_id = var.firestore_location
  type        = "FIRESTORE_NATIVE"
  # Serializable transactions with locks: what the lease and commit protocol relies on.
  concurrency_mode                  = "PESSIMISTIC"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = var.firestore_delete_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy                   = "DELETE"

  depends_on = [google_project_service.apis]
}

locals {
  database = var.create_firestore_database ? google_firestore_database.state[0].name : var.firestore_database
}

# status == active AND next_refresh_at <= now AND lease_expires_at <= now ORDER BY
# next_refresh_at: the claim, its tie read and the count of leased due connections all run on
# this one index (firestore.py, "Selecting due connections"). Without it Firestore answers
# FAILED_PRECONDITION.
resource "google_firestore_index" "due" {
  project     = var.project_id
  database    = local.database
  collection  = var.firestore_collection
  query_scope = "COLLECTION"

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }
  fields {
    field_path = "next_refresh_at"
    order      = "ASCENDING"
  }
  fields {
    field_path = "lease_expires_at"
    order      = "ASCENDING"
  }
}

# The same three queries of a fan-out worker, narrowed to its shard: bucket IN [its buckets]
# AND slot in its range (firestore.py, "Selecting due connections"). The IN scans one index
# range per bucket, so workers on different shards read and lock disjoint index entries.
# Unused while fanout_shards = 1; kept so that turning fan-out on needs no index build first.
resource "google_firestore_index" "due_in_shard" {
  project     = var.project_id
  database    = local.database
  collection  = var.firestore_collection
  query_scope = "COLLECTION"

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }
  fields {
    field_path = "bucket"
    order      = "ASCENDING"
  }
  fields {
    field_path = "next_refresh_at"
    order      = "ASCENDING"
  }
  fields {
    field_path = "lease_expires_at"
    order      = "ASCENDING"
  }
  fields {
    field_path = "slot"
    order      = "ASCENDING"
  }
}

# Budgets of refresh tokens long rotated away are deleted by TTL on expires_at
# (https://cloud.google.com/firestore/docs/ttl). Nothing queries that field: index_config {}
# exempts it from single-field indexing (a monotonically growing timestamp index is a hotspot).
resource "google_firestore_field" "budgets_ttl" {
  project    = var.project_id
  database   = local.database
  collection = "${var.firestore_collection}_budgets"
  field      = "expires_at"

  ttl_config {}
  index_config {}
}

# The connect function's authorization sessions (firestore_sessions.py) are deleted by TTL on
# expires_at once expired (within about a day; the flow refuses an expired session itself).
# Its purge queries expires_at, so the field keeps its single-field index.
resource "google_firestore_field" "sessions_ttl" {
  count      = var.connect.enabled ? 1 : 0
  project    = var.project_id
  database   = local.database
  collection = local.sessions_collection
  field      = "expires_at"

  ttl_config {}
}
