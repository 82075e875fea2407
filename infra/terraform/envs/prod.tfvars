# terraform apply -var-file=envs/prod.tfvars -var image_tag=<the tag cloudbuild.yaml pushed>
project            = "my-ftpipe-prod"
env                = "prod"
region             = "europe-west1"
firestore_location = "eur3"
bucket             = "my-ftpipe-prod-data"
dashboard_domain   = "ftpipe.example.com"
dashboard_users    = ["group:ml-team@example.com", "group:ml-reviewers@example.com"]
approvers          = ["ann@example.com", "bob@example.com"]

checkpoint_retention_days = 60
noncurrent_retention_days = 30

evaluator_gpu                   = true
evaluator_max_instances         = 4
evaluator_max_delivery_attempts = 20

system_pool = {
  machine_type = "e2-standard-8"
  min_nodes    = 1
  max_nodes    = 4
}

# Names and accelerators as recipes resolve them (shared/domain/recipe.py HardwareSpec.pool, GKE_ACCELERATORS).
gpu_pools = {
  "ftpipe-l4-spot" = {
    gpu           = "l4"
    accelerator   = "nvidia-l4"
    gpus_per_node = 1
    machine_type  = "g2-standard-8"
    spot          = true
    max_nodes     = 8
  }
  "ftpipe-l4" = {
    gpu           = "l4"
    accelerator   = "nvidia-l4"
    gpus_per_node = 1
    machine_type  = "g2-standard-8"
    spot          = false
    max_nodes     = 2
  }
  "ftpipe-a100-spot" = {
    gpu           = "a100"
    accelerator   = "nvidia-tesla-a100"
    gpus_per_node = 8
    machine_type  = "a2-highgpu-8g"
    spot          = true
    max_nodes     = 2
  }
}

gke_master_authorized_networks = {
  vpn = "198.51.100.0/24"
}
