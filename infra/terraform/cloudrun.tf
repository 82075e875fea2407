locals {
  evaluator_name = "ftpipe-evaluator-${var.env}"
  tracker_name   = "ftpipe-tracker-${var.env}"
  # The push subscription's token audience. Not the service URL: that is only known once the
  # service exists, and the service's own environment names the audience. Cloud Run accepts it as
  # a custom audience; the app checks it (FTPIPE_PUSH_AUDIENCE).
  evaluator_push_audience = "https://${local.evaluator_name}.${var.project}.ftpipe/pubsub/push"
  dashboard_audience      = "/projects/${data.google_project.this.number}/global/backendServices/${google_compute_backend_service.tracker.generated_id}"
  iap_agent               = "serviceAccount:${google_project_service_identity.agents["iap.googleapis.com"].email}"

  # Each service's settings beyond local.common_env (shared/platform/config.py Settings.from_env).
  evaluator_env = {
    FTPIPE_ACK_DEADLINE_S        = tostring(local.push_policy.ack_deadline_seconds)
    FTPIPE_MAX_DELIVERY_ATTEMPTS = tostring(var.evaluator_max_delivery_attempts)
    FTPIPE_PUSH_AUDIENCE         = local.evaluator_push_audience
    FTPIPE_PUSH_SERVICE_ACCOUNT  = google_service_account.sa["push"].email
  }
  tracker_env = {
    FTPIPE_DASHBOARD_AUDIENCE = local.dashboard_audience
  }
}

# ------------------------------------------------------------------ evaluator: Pub/Sub push
resource "google_cloud_run_v2_service" "evaluator" {
  name                = local.evaluator_name
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_ALL"
  custom_audiences    = [local.evaluator_push_audience]
  deletion_protection = false
  template {
    service_account                  = google_service_account.sa["evaluator"].email
    timeout                          = "3600s"
    max_instance_request_concurrency = 1 # an evaluation fills the GPU
    gpu_zonal_redundancy_disabled    = var.evaluator_gpu ? true : null
    scaling {
      min_instance_count = 0
      max_instance_count = var.evaluator_max_instances
    }
    dynamic "node_selector" {
      for_each = var.evaluator_gpu ? [1] : []
      content {
        accelerator = "nvidia-l4"
      }
    }
    containers {
      image = local.images["evaluator"]
      resources {
        limits   = merge({ cpu = "8", memory = "32Gi" }, var.evaluator_gpu ? { "nvidia.com/gpu" = "1" } : {})
        cpu_idle = false
      }
      dynamic "env" {
        for_each = merge(local.common_env, local.evaluator_env)
        content {
          name  = env.key
          value = env.value
        }
      }
      startup_probe {
        http_get {
          path = "/healthz"
        }
        period_seconds    = 10
        failure_threshold = 30
      }
      liveness_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }
  depends_on = [google_project_service.apis]
}

# Only the push account may call it (--no-allow-unauthenticated).
resource "google_cloud_run_v2_service_iam_member" "push_invokes_evaluator" {
  name     = google_cloud_run_v2_service.evaluator.name
  location = var.region
  role     = "roles/run.invoker"
  member   = local.sa_member["push"]
}

# ------------------------------------------------------------------ tracker: behind IAP
resource "google_cloud_run_v2_service" "tracker" {
  name                = local.tracker_name
  location            = var.region
  ingress             = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER" # only through the load balancer, so IAP
  deletion_protection = false
  template {
    service_account = google_service_account.sa["tracker"].email
    # The lineage writer pulls every topic: one always-on instance with its CPU never throttled.
    scaling {
      min_instance_count = 1
      max_instance_count = 1
    }
    containers {
      image = local.images["tracker"]
      resources {
        limits   = { cpu = "1", memory = "1Gi" }
        cpu_idle = false
      }
      dynamic "env" {
        for_each = merge(local.common_env, local.tracker_env)
        content {
          name  = env.key
          value = env.value
        }
      }
      startup_probe {
        http_get {
          path = "/healthz"
        }
      }
      liveness_probe {
        http_get {
          path = "/healthz"
        }
      }
    }
  }
  depends_on = [google_project_service.apis]
}

# IAP calls Cloud Run as its service agent.
resource "google_cloud_run_v2_service_iam_member" "iap_invokes_tracker" {
  name     = google_cloud_run_v2_service.tracker.name
  location = var.region
  role     = "roles/run.invoker"
  member   = local.iap_agent
}

# The HTTPS load balancer in front of the tracker, with IAP on its backend; the backend's id is
# the audience of IAP's signed header (shared/platform/auth.py iap_authenticator).
resource "google_compute_region_network_endpoint_group" "tracker" {
  name                  = local.tracker_name
  region                = var.region
  network_endpoint_type = "SERVERLESS"
  cloud_run {
    service = local.tracker_name # by name: the service's environment needs this backend's id
  }
}

resource "google_compute_backend_service" "tracker" {
  name                  = local.tracker_name
  protocol              = "HTTPS"
  load_balancing_scheme = "EXTERNAL_MANAGED"
  backend {
    group = google_compute_region_network_endpoint_group.tracker.id
  }
  iap {
    enabled              = true
    oauth2_client_id     = var.iap_oauth2_client_id == "" ? null : var.iap_oauth2_client_id
    oauth2_client_secret = var.iap_oauth2_client_secret == "" ? null : var.iap_oauth2_client_secret
  }
  log_config {
    enable      = true
    sample_rate = 1
  }
}

resource "google_iap_web_backend_service_iam_member" "dashboard_users" {
  for_each            = toset(var.dashboard_users)
  web_backend_service = google_compute_backend_service.tracker.name
  role                = "roles/iap.httpsResourceAccessor"
  member              = each.key
}

resource "google_compute_url_map" "dashboard" {
  name            = "ftpipe-dashboard-${var.env}"
  default_service = google_compute_backend_service.tracker.id
}

resource "google_compute_managed_ssl_certificate" "dashboard" {
  name = "ftpipe-dashboard-${var.env}"
  managed {
    domains = [var.dashboard_domain]
  }
}

resource "google_compute_ssl_policy" "modern" {
  name            = "ftpipe-${var.env}-modern"
  profile         = "MODERN"
  min_tls_version = "TLS_1_2"
}

resource "google_compute_target_https_proxy" "dashboard" {
  name             = "ftpipe-dashboard-${var.env}"
  url_map          = google_compute_url_map.dashboard.id
  ssl_certificates = [google_compute_managed_ssl_certificate.dashboard.id]
  ssl_policy       = google_compute_ssl_policy.modern.id
}

resource "google_compute_global_address" "dashboard" {
  name = "ftpipe-dashboard-${var.env}"
}

resource "google_compute_global_forwarding_rule" "dashboard" {
  name                  = "ftpipe-dashboard-${var.env}"
  target                = google_compute_target_https_proxy.dashboard.id
  ip_address            = google_compute_global_address.dashboard.address
  port_range            = "443"
  load_balancing_scheme = "EXTERNAL_MANAGED"
}
