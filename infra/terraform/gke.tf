# The trainer's cluster: a small CPU pool for the preprocess service, Kueue and add-ons, and one
# GPU pool per var.gpu_pools entry that scales from zero. services/trainer/k8s.py selects a pool by
# `cloud.google.com/gke-nodepool` (the recipe's hardware.pool) and `cloud.google.com/gke-accelerator`,
# and tolerates the GPU and spot taints set here. Cluster objects (namespace, service accounts,
# PriorityClasses, Kueue queues, the workers) are in infra/k8s/.
resource "google_container_cluster" "main" {
  #checkov:skip=CKV_GCP_65:Google Groups for RBAC needs a Google Workspace domain (authenticator_groups_config); workloads here use Workload Identity, people use IAM roles
  name     = "ftpipe-${var.env}"
  location = var.region

  network         = google_compute_network.vpc.id
  subnetwork      = google_compute_subnetwork.main.id
  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Node pools are managed below; the default one is removed at creation.
  remove_default_node_pool = true
  initial_node_count       = 1
  node_config {
    service_account = google_service_account.sa["gke_nodes"].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  release_channel {
    channel = "REGULAR"
  }
  workload_identity_config {
    workload_pool = "${var.project}.svc.id.goog"
  }
  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.gke_master_cidr
  }
  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.gke_master_authorized_networks
      content {
        display_name = cidr_blocks.key
        cidr_block   = cidr_blocks.value
      }
    }
  }
  network_policy {
    enabled  = true
    provider = "CALICO"
  }
  addons_config {
    network_policy_config {
      disabled = false
    }
  }
  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }
  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }
  resource_labels = {
    app = "ftpipe"
    env = var.env
  }
  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    managed_prometheus {
      enabled = true
    }
  }
  deletion_protection = true
  depends_on          = [google_project_service.apis]
}

locals {
  node_defaults = {
    image_type = "COS_CONTAINERD"
    metadata   = { disable-legacy-endpoints = "true" }
  }
}

resource "google_container_node_pool" "system" {
  name     = "ftpipe-system"
  cluster  = google_container_cluster.main.id
  location = var.region
  autoscaling {
    total_min_node_count = var.system_pool.min_nodes
    total_max_node_count = var.system_pool.max_nodes
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = var.system_pool.machine_type
    image_type      = local.node_defaults.image_type
    metadata        = local.node_defaults.metadata
    service_account = google_service_account.sa["gke_nodes"].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "gpu" {
  for_each = var.gpu_pools
  name     = each.key
  cluster  = google_container_cluster.main.id
  location = var.region
  # From zero: a node is created when a trainer pod (a run's Job, or a worker replica) waits for
  # one, and removed when none runs on it. ANY spreads spot requests over the region's zones.
  initial_node_count = 0
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = each.value.max_nodes
    location_policy      = "ANY"
  }
  management {
    auto_repair  = true
    auto_upgrade = true
  }
  node_config {
    machine_type    = each.value.machine_type
    spot            = each.value.spot
    image_type      = local.node_defaults.image_type
    metadata        = local.node_defaults.metadata
    service_account = google_service_account.sa["gke_nodes"].email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    guest_accelerator {
      type  = each.value.accelerator
      count = each.value.gpus_per_node
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }
    labels = {
      "ftpipe.dev/gpu" = each.value.gpu
    }
    # GKE taints GPU nodes with nvidia.com/gpu itself; the spot taint keeps pods that did not ask
    # for spot (the rendered Job tolerates it when hardware.spot) off preemptible nodes.
    dynamic "taint" {
      for_each = each.value.spot ? [1] : []
      content {
        key    = "cloud.google.com/gke-spot"
        value  = "true"
        effect = "NO_SCHEDULE"
      }
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}
