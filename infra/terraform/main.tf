data "google_project" "this" {
  project_id = var.project
}

locals {
  apis = [
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "dataproc.googleapis.com",
    "eventarc.googleapis.com",
    "firestore.googleapis.com",
    "iam.googleapis.com",
    "iap.googleapis.com",
    "pubsub.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
  ]
  # What cloudbuild.yaml uploads for a build: ftpipe-py3-none-any.whl, preprocess_job.py, registry-fn.zip.
  dist = "dist/${var.image_tag}"
  images = {
    for service in ["preprocess", "trainer", "evaluator", "tracker"] :
    service => "${var.region}-docker.pkg.dev/${var.project}/${google_artifact_registry_repository.images.repository_id}/${service}:${var.image_tag}"
  }
  # What every service's environment starts with (shared/platform/config.py Settings.from_env).
  common_env = {
    FTPIPE_PROFILE               = "gcp"
    FTPIPE_PROJECT               = var.project
    FTPIPE_BUCKET                = google_storage_bucket.data.name
    FTPIPE_LOG_FORMAT            = "json"
    FTPIPE_MAX_DELIVERY_ATTEMPTS = tostring(var.max_delivery_attempts)
    FTPIPE_ACK_DEADLINE_S        = tostring(local.subscription_policy.ack_deadline_seconds)
    FTPIPE_ADMINS                = join(",", var.admins)
    FTPIPE_JOB_DOORS             = join(",", keys(local.doors))
    FTPIPE_JUDGE_URLS            = join(",", var.judge_urls)
  }
}

resource "google_project_service" "apis" {
  for_each           = toset(local.apis)
  project            = var.project
  service            = each.key
  disable_on_destroy = false
}

# Google's service agents, created now so that the grants below find them.
resource "google_project_service_identity" "agents" {
  provider   = google-beta
  for_each   = toset(["pubsub.googleapis.com", "iap.googleapis.com"])
  project    = var.project
  service    = each.key
  depends_on = [google_project_service.apis]
}

data "google_storage_project_service_account" "gcs" {
  project    = var.project
  depends_on = [google_project_service.apis]
}

# ------------------------------------------------------------------ network
# One VPC for GKE and Dataproc Serverless. Dataproc needs Private Google Access on its subnet and
# its executors talking to each other on any port inside it.
resource "google_compute_network" "vpc" {
  name                    = "ftpipe-${var.env}"
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

resource "google_compute_subnetwork" "main" {
  name                     = "ftpipe-${var.env}-${var.region}"
  network                  = google_compute_network.vpc.id
  region                   = var.region
  ip_cidr_range            = "10.10.0.0/20"
  private_ip_google_access = true
  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = "10.20.0.0/14"
  }
  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = "10.24.0.0/20"
  }
  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_firewall" "internal" {
  name          = "ftpipe-${var.env}-internal"
  network       = google_compute_network.vpc.id
  direction     = "INGRESS"
  source_ranges = [google_compute_subnetwork.main.ip_cidr_range]
  allow {
    protocol = "all"
  }
}

# Nodes and Dataproc executors have no external IPs; Cloud NAT lets them fetch what is not behind
# Private Google Access (e.g. a base model from a hub).
resource "google_compute_router" "nat" {
  name    = "ftpipe-${var.env}-nat"
  network = google_compute_network.vpc.id
  region  = var.region
}

resource "google_compute_router_nat" "nat" {
  name                               = "ftpipe-${var.env}-nat"
  router                             = google_compute_router.nat.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"
  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# ------------------------------------------------------------------ Artifact Registry
resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption keys; a project that requires CMEK adds kms_key_name here and grants the service agent the key
  repository_id = "ftpipe"
  location      = var.region
  format        = "DOCKER"
  description   = "ftpipe service images (cloudbuild.yaml)"
  docker_config {
    immutable_tags = true
  }
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 20
    }
  }
  depends_on = [google_project_service.apis]
}
