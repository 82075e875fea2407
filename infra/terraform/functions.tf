# The registry as two 2nd-gen Cloud Functions from one source (services/registry_fn/main.py,
# packaged by cloudbuild.yaml as gs://BUCKET/dist/TAG/registry-fn.zip from infra/functions/registry/).
locals {
  registry_name = "ftpipe-registry-${var.env}"
  approve_name  = "ftpipe-registry-approve-${var.env}"
  # A 2nd-gen function's cloudfunctions.net URL is known before it exists; its own environment names it.
  approve_url = "https://${var.region}-${var.project}.cloudfunctions.net/${local.approve_name}"
  registry_env = {
    FTPIPE_APPROVAL_AUDIENCE = var.approval_audience != "" ? var.approval_audience : local.approve_url
  }
  registry_source = {
    bucket = google_storage_bucket.data.name
    object = "${local.dist}/registry-fn.zip"
  }
}

# on_evaluation: a CloudEvent handler on `evaluations`. Eventarc makes the subscription; a raised
# exception (the handler's nack) is redelivered by RETRY_POLICY_RETRY. Eventarc's subscription
# takes no dead-letter policy from Terraform (its name is Eventarc's): docs/deploy.md adds one.
resource "google_cloudfunctions2_function" "registry" {
  name     = local.registry_name
  location = var.region
  build_config {
    runtime     = "python311"
    entry_point = "on_evaluation"
    source {
      storage_source {
        bucket = local.registry_source.bucket
        object = local.registry_source.object
      }
    }
  }
  service_config {
    available_memory               = "1Gi"
    timeout_seconds                = 540
    max_instance_count             = 5
    ingress_settings               = "ALLOW_INTERNAL_ONLY"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.sa["registry"].email
    environment_variables          = merge(local.common_env, local.registry_env)
  }
  event_trigger {
    trigger_region        = var.region
    event_type            = "google.cloud.pubsub.topic.v1.messagePublished"
    pubsub_topic          = google_pubsub_topic.topics[local.event_triggers["registry.evaluations"].topic].id
    retry_policy          = "RETRY_POLICY_RETRY"
    service_account_email = google_service_account.sa["registry"].email
  }
  depends_on = [google_project_service.apis]
}

# The trigger delivers as the registry's account.
resource "google_cloud_run_service_iam_member" "trigger_invokes_registry" {
  location = var.region
  service  = google_cloudfunctions2_function.registry.service_config[0].service
  role     = "roles/run.invoker"
  member   = local.sa_member["registry"]
}

# approve: the authenticated HTTP approval (--no-allow-unauthenticated): only var.approvers may call it,
# and the function checks the caller's ftpipe role (shared/domain/access.py) on the model it approves.
resource "google_cloudfunctions2_function" "approve" {
  #checkov:skip=CKV_GCP_124:approvers call it from their own machines; IAM lets only them invoke it and the function checks their ID token and their approver role
  name     = local.approve_name
  location = var.region
  build_config {
    runtime     = "python311"
    entry_point = "approve"
    source {
      storage_source {
        bucket = local.registry_source.bucket
        object = local.registry_source.object
      }
    }
  }
  service_config {
    available_memory               = "512Mi"
    timeout_seconds                = 60
    max_instance_count             = 2
    ingress_settings               = "ALLOW_ALL"
    all_traffic_on_latest_revision = true
    service_account_email          = google_service_account.sa["registry"].email
    environment_variables          = merge(local.common_env, local.registry_env)
  }
  depends_on = [google_project_service.apis]
}

resource "google_cloud_run_service_iam_member" "approvers_invoke" {
  for_each = toset(var.approvers)
  location = var.region
  service  = google_cloudfunctions2_function.approve.service_config[0].service
  role     = "roles/run.invoker"
  member   = "user:${each.key}"
}
