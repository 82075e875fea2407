# Dataproc Serverless (services/preprocess/dataproc.py, FTPIPE_PREPROCESS_RUNNER=dataproc): the
# preprocess service creates one batch per run and waits for it; the batch runs as its own account.

# The batch's account: what Dataproc Serverless needs of its workers, plus the bucket (above) and
# the custom image (Artifact Registry reader, iam.tf).
resource "google_project_iam_member" "dataproc_worker" {
  project = var.project
  role    = "roles/dataproc.worker"
  member  = local.sa_member["dataproc"]
}

# The preprocess service creates and reads batches (create_batch, get_batch and the operation),
# nothing else of Dataproc.
resource "google_project_iam_custom_role" "batch_submitter" {
  role_id     = "ftpipeBatchSubmitter${title(replace(var.env, "-", ""))}"
  title       = "ftpipe Dataproc batch submitter (${var.env})"
  description = "Create and read Dataproc Serverless batches and their operations."
  permissions = [
    "dataproc.batches.create",
    "dataproc.batches.get",
    "dataproc.operations.get",
  ]
}

resource "google_project_iam_member" "preprocess_submits_batches" {
  project = var.project
  role    = google_project_iam_custom_role.batch_submitter.id
  member  = local.sa_member["preprocess"]
}

# ... as the batch account (actAs), and no other.
resource "google_service_account_iam_member" "preprocess_acts_as_dataproc" {
  service_account_id = google_service_account.sa["dataproc"].name
  role               = "roles/iam.serviceAccountUser"
  member             = local.sa_member["preprocess"]
}

locals {
  # The preprocess service's Dataproc settings (shared/platform/config.py dataproc_*). The wheel and the
  # job's entrypoint are uploaded by cloudbuild.yaml (docs/deploy.md).
  dataproc_env = {
    FTPIPE_PREPROCESS_RUNNER        = "dataproc"
    FTPIPE_DATAPROC_REGION          = var.region
    FTPIPE_DATAPROC_RUNTIME_VERSION = "3.0"
    FTPIPE_DATAPROC_SERVICE_ACCOUNT = google_service_account.sa["dataproc"].email
    FTPIPE_DATAPROC_SUBNETWORK      = google_compute_subnetwork.main.id
    FTPIPE_DATAPROC_WHEEL_URI       = "gs://${google_storage_bucket.data.name}/${local.dist}/ftpipe-py3-none-any.whl"
    FTPIPE_DATAPROC_MAIN_URI        = "gs://${google_storage_bucket.data.name}/${local.dist}/preprocess_job.py"
    FTPIPE_DATAPROC_CONTAINER_IMAGE = local.images["preprocess"]
  }
}
