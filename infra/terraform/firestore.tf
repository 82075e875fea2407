# The documents of the DocStore port (shared/platform/adapters/firestore.py uses the (default) database).
resource "google_firestore_database" "default" {
  name                              = "(default)"
  location_id                       = var.firestore_location
  type                              = "FIRESTORE_NATIVE"
  concurrency_mode                  = "PESSIMISTIC"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = "DELETE_PROTECTION_ENABLED"
  deletion_policy                   = "ABANDON"
  depends_on                        = [google_project_service.apis]
}

# The processed-message ledgers of the services that only read (default) (shared/platform/topology.py
# DOCS_READERS and ledger_database_for: serving, which reads the registry's documents). Its one
# write, the runtime's ledger, goes to a database of its own, where alone it may write (iam.tf), so
# a compromised server can read the registry but not change it. The other way, registry reads
# through the tracker's API, would put an IAP-fronted service in serving's request path, and its
# ledger would still need a home.
resource "google_firestore_database" "ledger" {
  for_each                          = toset(local.docs_readers)
  name                              = "${each.key}-ledger"
  location_id                       = var.firestore_location
  type                              = "FIRESTORE_NATIVE"
  concurrency_mode                  = "PESSIMISTIC"
  point_in_time_recovery_enablement = "POINT_IN_TIME_RECOVERY_ENABLED"
  delete_protection_state           = "DELETE_PROTECTION_ENABLED"
  deletion_policy                   = "ABANDON"
  depends_on                        = [google_project_service.apis]
}

# Composite indexes: Firestore needs one for an equality filter with an order on another field
# (several equality filters merge their indexes). The queries that do it are the tracker API's
# (services/tracker/api.py: runs by RUN_FILTERS ordered by RUN_ORDER or a metric, a run's metrics
# by step and its events by seq) and `ftpipe runs --status` (ftpipe/client.py). tests/infra checks
# these lists against the code, and that no other query of the code needs one.
locals {
  run_filters = ["status", "recipe.name", "tenant", "model_name", "dataset.id"]
  run_orders  = concat(["created_at", "updated_at", "status"], var.firestore_run_metric_orders)
  firestore_indexes = merge(
    {
      for combo in setproduct(local.run_filters, local.run_orders, ["ASCENDING", "DESCENDING"]) :
      "runs:${combo[0]}:${combo[1]}:${combo[2]}" => {
        collection = "runs"
        fields     = [{ path = combo[0], order = "ASCENDING" }, { path = combo[1], order = combo[2] }]
      } if combo[0] != combo[1]
    },
    {
      "metrics:run_id:step:ASCENDING" = {
        collection = "metrics"
        fields     = [{ path = "run_id", order = "ASCENDING" }, { path = "step", order = "ASCENDING" }]
      }
      "run_events:run_id:seq:ASCENDING" = {
        collection = "run_events"
        fields     = [{ path = "run_id", order = "ASCENDING" }, { path = "seq", order = "ASCENDING" }]
      }
    },
  )
}

resource "google_firestore_index" "composite" {
  for_each    = local.firestore_indexes
  database    = google_firestore_database.default.name
  collection  = each.value.collection
  query_scope = "COLLECTION"
  dynamic "fields" {
    for_each = each.value.fields
    content {
      field_path = fields.value.path
      order      = fields.value.order
    }
  }
}
