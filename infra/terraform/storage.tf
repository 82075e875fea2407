# The one bucket the code uses (FTPIPE_BUCKET, Settings.bucket). Layout: docs/DESIGN.md.
resource "google_storage_bucket" "data" {
  #checkov:skip=CKV_GCP_62:usage logs would need a second bucket; who read or wrote what is in Cloud Audit Logs (enable Data Access logs for storage.googleapis.com where required)
  name                        = var.bucket
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  versioning {
    enabled = true
  }

  # Checkpoints (runs/<run>/checkpoints/step-<N>/). The trainer prunes all but the latest few and
  # the best (services/trainer/service.py prune_checkpoints); with versioning on, a pruned file
  # lives on as a noncurrent version, deleted here a day later.
  lifecycle_rule {
    condition {
      matches_prefix             = ["runs/"]
      days_since_noncurrent_time = 1
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
  # Lifecycle rules match prefixes, not runs/*/checkpoints/, so this one takes the resume state of
  # old checkpoints by its suffix: optimizer.pt, scheduler.pt and rng*.pt are only ever written
  # into a checkpoint (the final adapter and the models are safetensors and JSON). A checkpoint
  # older than this keeps its weights (it can still be evaluated or exported) but no longer resumes.
  lifecycle_rule {
    condition {
      age            = var.checkpoint_retention_days
      matches_prefix = ["runs/"]
      matches_suffix = [".pt"]
      with_state     = "LIVE"
    }
    action {
      type = "Delete"
    }
  }
  # Archives: raw drops and prepared datasets are read rarely once their runs are done.
  lifecycle_rule {
    condition {
      age            = 30
      matches_prefix = ["incoming/", "datasets/"]
      with_state     = "LIVE"
    }
    action {
      type          = "SetStorageClass"
      storage_class = "NEARLINE"
    }
  }
  lifecycle_rule {
    condition {
      age            = var.archive_after_days
      matches_prefix = ["incoming/", "datasets/"]
      with_state     = "LIVE"
    }
    action {
      type          = "SetStorageClass"
      storage_class = "ARCHIVE"
    }
  }
  # Every other overwritten or deleted object: kept a while for recovery, then gone.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_retention_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }
  # Dataproc batches stage their output (staging/) and JSON arrays (tmp/) here.
  lifecycle_rule {
    condition {
      age            = 7
      matches_prefix = ["staging/", "tmp/"]
    }
    action {
      type = "Delete"
    }
  }
  depends_on = [google_project_service.apis]
}

# GCS announces each new object under incoming/ on dataset-uploads (what shared/platform/notifications.py
# does for the local store): a drop at incoming/<recipe>/<file> starts a run.
resource "google_storage_notification" "incoming" {
  bucket             = google_storage_bucket.data.name
  topic              = google_pubsub_topic.topics["dataset-uploads"].id
  payload_format     = "JSON_API_V1"
  event_types        = ["OBJECT_FINALIZE"]
  object_name_prefix = "incoming/"
  depends_on         = [google_pubsub_topic_iam_member.gcs_publishes_uploads]
}

resource "google_pubsub_topic_iam_member" "gcs_publishes_uploads" {
  topic  = google_pubsub_topic.topics["dataset-uploads"].id
  role   = "roles/pubsub.publisher"
  member = "serviceAccount:${data.google_storage_project_service_account.gcs.email_address}"
}
