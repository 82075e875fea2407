# terraform apply -var-file=envs/dev.tfvars -var image_tag=$(git rev-parse --short HEAD)
project          = "my-ftpipe-dev"
env              = "dev"
region           = "europe-west1"
bucket           = "my-ftpipe-dev-data"
dashboard_domain = "ftpipe-dev.example.com"
dashboard_users  = ["group:ml-team@example.com"]
approvers        = ["ann@example.com"]

evaluator_gpu           = true
evaluator_max_instances = 1

system_pool = {
  machine_type = "e2-standard-4"
  min_nodes    = 1
  max_nodes    = 2
}

# Names and accelerators as recipes resolve them (shared/domain/recipe.py HardwareSpec.pool, GKE_ACCELERATORS).
gpu_pools = {
  "ftpipe-l4-spot" = {
    gpu           = "l4"
    accelerator   = "nvidia-l4"
    gpus_per_node = 1
    machine_type  = "g2-standard-8"
    spot          = true
    max_nodes     = 2
  }
}

gke_master_authorized_networks = {
  office = "203.0.113.0/24"
}
