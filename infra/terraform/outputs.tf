output "bucket" {
  description = "FTPIPE_BUCKET"
  value       = google_storage_bucket.data.name
}

output "project" {
  description = "FTPIPE_PROJECT"
  value       = var.project
}

output "images" {
  description = "The service images this configuration deploys."
  value       = local.images
}

output "artifact_registry" {
  description = "Where cloudbuild.yaml pushes (its _REPOSITORY)."
  value       = "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}"
}

output "service_accounts" {
  description = "The account of each service."
  value       = { for k, sa in google_service_account.sa : k => sa.email }
}

output "gke_cluster" {
  description = "gcloud container clusters get-credentials NAME --region REGION"
  value       = { name = google_container_cluster.main.name, region = var.region }
}

output "evaluator_url" {
  value = google_cloud_run_v2_service.evaluator.uri
}

output "dashboard_ip" {
  description = "Point the dashboard domain's A record here; the managed certificate is issued once it resolves."
  value       = google_compute_global_address.dashboard.address
}

output "dashboard_url" {
  value = "https://${var.dashboard_domain}"
}

output "approve_url" {
  description = "POST {\"name\", \"version\", \"note\"} here with an ID token (README, Model registry)."
  value       = google_cloudfunctions2_function.approve.url
}

output "preprocess_env" {
  description = "The preprocess service's environment (infra/k8s/preprocess.yaml), Dataproc settings included."
  value       = merge(local.common_env, local.dataproc_env)
}

output "trainer_env" {
  description = "The trainer's environment (infra/k8s/trainer.yaml, and `ftpipe train --render-k8s` Jobs)."
  value       = local.common_env
}

output "serving_env" {
  description = "The serving container's environment (Cloud Run or GKE, as the serving account): its ledger's database and who may call it."
  value = merge(local.common_env, {
    FTPIPE_LEDGER_DATABASE = google_firestore_database.ledger["serving"].name
    FTPIPE_SERVING_CALLERS = join(",", var.serving_callers)
  })
}
